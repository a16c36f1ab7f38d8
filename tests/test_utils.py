"""cryolatent.utils: atomic_path permissions, resolve_device."""

import os
import stat

import pytest
import torch

from cryolatent.errors import CryolatentError
from cryolatent.utils import atomic_path, resolve_device


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_path_gives_the_mode_open_would(tmp_path, mask):
    old = os.umask(mask)
    try:
        ref = tmp_path / "ref.txt"
        with open(ref, "w") as f:        # the reference: a plain open()
            f.write("x")
        new = tmp_path / "new.txt"
        with atomic_path(new) as tmp:
            tmp.write_text("x")
        assert _mode(new) == _mode(ref) == 0o666 & ~mask
    finally:
        os.umask(old)


def test_atomic_path_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    p = tmp_path / "out.star"
    p.write_text("old")
    os.chmod(p, 0o640)
    with atomic_path(p) as tmp:
        tmp.write_text("new")
    assert p.read_text() == "new" and _mode(p) == 0o640
    assert not list(tmp_path.glob(".*.tmp"))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CryolatentError, match=r"--device 'gpu0'") as e:
        resolve_device("gpu0")
    assert "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(CryolatentError, match=r"--device cuda: no CUDA GPU"):
            resolve_device("cuda")
        with pytest.raises(CryolatentError, match=r"--device cuda:1: no CUDA GPU"):
            resolve_device("cuda:1")


def test_defer_sigint_holds_ctrl_c_until_the_block_ends():
    import os
    import signal

    from cryolatent.utils import defer_sigint

    done = []
    with pytest.raises(KeyboardInterrupt):
        with defer_sigint():
            os.kill(os.getpid(), signal.SIGINT)   # delivered now, held by the handler
            done.append("first write")
            done.append("second write")
    assert done == ["first write", "second write"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with defer_sigint():                           # no signal: nothing raised
        done.append("third")
    assert done[-1] == "third"


def test_prefetch_keeps_order_errors_and_stops():
    """utils.prefetch: the items in order, an error re-raised in the consumer, an early exit
    stops the producer; ParticleSet.iter_batches(prefetch=N) gives the same batches."""
    import itertools

    from cryolatent.utils import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def bad():
        yield 1
        raise ValueError("boom")

    it = prefetch(bad())
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    made = []
    counter = (made.append(i) or i for i in itertools.count())
    first = list(itertools.islice(prefetch(counter, depth=2), 5))
    assert first == [0, 1, 2, 3, 4] and len(made) < 1000
