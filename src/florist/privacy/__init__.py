"""Differential privacy: the accountant (``accountant``) and client-level DP on the server
(``client_level``: each client's round change clipped in factored form, Gaussian noise on the sum)."""
