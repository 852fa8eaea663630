"""A Flower deployment with TLS and SuperNode authentication: certificates, processes, ``florist deploy``;
and the local SuperLink that ``florist run``'s simulation shares with it.

certs.py      a CA, the SuperLink's certificate, SuperNode keys (OpenSSH ECDSA)
processes.py  processes with logs in files, every descendant pid recorded, stopped by pid
link.py       ``LocalLink``: a SuperLink on 127.0.0.1 and ``flwr run`` after ``flwr run`` through it
launch.py     ``Deployment``: SuperLink, registered SuperNodes, ``flwr run``
runconfig.py  the run config passed to ``flwr run``
command.py    the ``florist deploy`` command

``florist.cli`` imports command.py only to run ``florist deploy``; launch.py needs cryptography and is
imported when a deployment starts.
"""
