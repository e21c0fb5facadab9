"""Graph passes of s2h-fx (installed as ``s2h_fx.passes``)."""
