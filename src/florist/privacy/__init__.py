"""Differential privacy: the accountant (``accountant``), DP-SGD on every client (``sample_level``) and
client-level DP on a trusted server (``client_level``: each client's round change clipped in factored
form, Gaussian noise on the sum)."""
