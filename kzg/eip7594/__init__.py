"""EIP-7594 (PeerDAS) on the blspy engine: cells of the Reed-Solomon extended blob, their
KZG multi-proofs (FK20), recovery from half the cells, and batch verification.

Laid out like the math: ``cells`` (extension and encoding), ``fk20`` (all 128 proofs at
once), ``recovery`` (erasure decoding), ``verify`` (the universal verification
equation); ``engine`` glues them to the setup and its cached precomputation.
"""
