"""Training recipes shipped with bimedix (installed as `bimedix.recipes`); see README.md here."""
