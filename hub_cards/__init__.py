"""Hub card templates shipped with bimedix (installed as `bimedix.hub_cards`)."""
