"""The maths of masked diffusion: seeded masks, the ELBO estimator, mask replay, DPO losses, the SFT objective."""
