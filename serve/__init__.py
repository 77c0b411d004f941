"""Host side of a request's life: gRPC server, scheduler, page manager (the serving issue).

Talks to the device only through `jaxinfer.runner`.
"""
