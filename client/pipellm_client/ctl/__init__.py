"""`pipellmctl`: look at a running pipellmd (status, sessions, events, health) from a shell or a probe.

One module per verb; `main.py` parses the command line and turns failures into the exit codes of
`exitcodes.py`. Nothing here can print key material: it only renders what `GetStatus`, `ListSessions`,
`Watch` and grpc.health.v1 return, and none of those carries any.
"""
