"""IRL-INR, one clean CENTRED asymmetric object, full loss: does the trained encoder recover ψ?

Tiny CPU check used for docs/irl-inr-rotation.md §5 (ad-hoc, kept for reproducibility):
one two-blob "tadpole" moved so its centre of mass is the box centre, 400 rotations
ψ ~ U(0, 360) (analytic), white noise at SNR (0: none), box 24; tiny IRL-INR, 400 steps of batch 32, Adam 3e-3,
consistency MSE, lambda_symmetry 15. Prints the circular correlation of the predicted angle
with the rule's own target and with the truth every 100 steps.

    python benchmarks/irl_inr_centred_single.py LAMBDA_RECON LAMBDA_CONSISTENCY {moments,com} [SNR]
"""
import importlib.util, numpy as np, torch, math, time, sys
torch.set_num_threads(2)
spec = importlib.util.spec_from_file_location("b", __file__.replace("_single", "")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
from cryolatent.models.irl_inr import IRLINR, symmetry_targets
rng = np.random.default_rng(0); box=24; n=400
blobs=[(1.0,-1.0,0,4.0,1.5),(0.8,5.0,0,1.5,1.5)]
w=np.array([a*sx*sy for a,_,_,sx,sy in blobs]); mx=(w*np.array([q[1] for q in blobs])).sum()/w.sum(); blobs=[(a,cx-mx,cy,sx,sy) for a,cx,cy,sx,sy in blobs]
psi = rng.uniform(0,360,n); clean = b.render(blobs, box, psi)
snr = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0   # 0: no noise
imgs = torch.from_numpy(clean + (math.sqrt(clean.var() / snr) * rng.standard_normal(clean.shape) if snr else 0)).float()
tgt = b.angle(symmetry_targets(imgs, sys.argv[3])[0])
print("rule vs truth", b.circular_corr(tgt, psi))
lr_, lc_ = float(sys.argv[1]), float(sys.argv[2])
torch.manual_seed(0)
m = IRLINR(box, z_dim=2, enc_width=8, hyper_width=32, hyper_layers=1, inr_width=16, inr_layers=1, fourier_features=16,
           lambda_recon=lr_, lambda_consistency=lc_, lambda_symmetry=15.0, consistency_loss="mse", rotation_rule=sys.argv[3])
opt = torch.optim.Adam(m.parameters(), lr=3e-3)
t=time.time()
for s in range(400):
    idx = torch.randint(0, n, (32,))
    loss, parts = m.loss(imgs[idx]); opt.zero_grad(); loss.backward(); opt.step()
    if s % 100 == 99:
        with torch.no_grad():
            m.train(); ptr = b.angle(m.encode(imgs)[1])
        print(s, {k: round(float(v),4) for k,v in parts.items()}, "pred vs target", round(b.circular_corr(ptr, tgt),3), "vs truth", round(b.circular_corr(ptr, psi),3), round(time.time()-t))
