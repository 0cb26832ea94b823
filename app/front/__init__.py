"""The front end of a server of several models, each in its own process.

One process listens on the service's port and routes each request to the process of the
model it names (`router`); every model runs in a process of its own, a one-model server
on a Unix socket (`supervisor`, `child`). A flood of one model then costs the others
neither their event loop nor their engine: what they share is the cores, split by
`MODEL_WEIGHTS`, and this front end, which only reads a request's model and copies
bytes. The front end imports no torch; the model processes are forked from a server
that has imported it once (`zygote`), so its pages are shared rather than held per model.
"""
