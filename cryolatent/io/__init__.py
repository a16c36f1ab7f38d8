"""Particle I/O: RELION STAR, cryoSPARC .cs and MRC stacks.

    ps = load_particles("particles.star", datadir=None, apix=None)   # .star / .cs / .mrcs
    ps.images(idx)            # float32 (n, box, box), memory-mapped batched reads; a
                              #   particle with NaN/Inf pixels raises InputError naming it
    ps.release(idx)           # drop those particles' mapped pages from this process
    write_star(path, particles_df, optics_df)   # RELION 3.1 layout, atomic
    read_star(path)           # {block name: DataFrame}
    read_particle_table(path) # (particles, optics) checked, without opening the stacks
    particle_block(blocks, path)    # the one rule for which STAR block is the particle table
    particles.image_names_from_cwd(table, path)   # rlnImageName naming the stacks from the
                              #   current directory, as every STAR cryolatent writes (and
                              #   ParticleSet.table) does
    particle_keys(names)      # "000012@Particles/s.mrcs" -> "12@s.mrcs": names compared
                              #   across files (nth_keys: repeated names pair by position)
    with MRCStackWriter(path, box, apix) as w: w.write(batch)
    write_mrcs(path, images, apix); write_cs(path, structured_array)
"""

from .cs import cs_to_relion, read_cs, write_cs
from .mrc import (MRCStackWriter, check_finite, read_header, read_images, release_pages,
                  write_mrcs)
from .particles import (ParticleSet, load_particles, nth_keys, particle_block, particle_keys,
                        read_particle_table)
from .star import read_star, upgrade_relion30, write_star, write_star_blocks

__all__ = ["load_particles", "ParticleSet", "read_particle_table", "particle_block",
           "particle_keys", "nth_keys", "read_star", "write_star", "write_star_blocks",
           "upgrade_relion30", "MRCStackWriter", "write_mrcs", "read_header", "read_images",
           "release_pages", "check_finite", "read_cs", "write_cs", "cs_to_relion"]
