"""What the scripts share to run a model: checkpoints and their specs, sampling, the VAE, image
and npz files, atomic file writing, and the command-line plumbing (one-line errors, shared flags)."""
