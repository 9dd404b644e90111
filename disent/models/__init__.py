"""The model: the VAE (`vae`), the discriminator and latent critics (`discriminator`), the
objective (`objective`) and its weights (`loss_weights`). Import the module you need: this package
imports nothing, so the config schema can read `loss_weights` without loading torch."""
