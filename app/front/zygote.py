"""The fork server of the model processes: `python -m app.front.zygote CMD REPLY LIFE`.

It imports torch, ONNX Runtime and the service once (`child`), then forks a model
process for each command line it reads from the file descriptor CMD (JSON: `values`,
`socket`), writing the new pid as a line to REPLY. Every model process thus shares the
pages of those imports with the others instead of holding its own. It exits when CMD
closes: the front end closes it as soon as its model processes are started, so the
fork server holds nothing while the models serve (a later load starts a new one).

LIFE is the read end of a pipe whose write end only the front end holds: a model
process sees it close when the front end dies, and drains and exits then.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main(cmd_fd: int, reply_fd: int, life_fd: int) -> None:
    from app.front import child  # the imports every model process shares

    # Reaped by the kernel: once this process exits, its model processes are the front
    # end's (a child subreaper), which then collects their exit statuses itself.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the front end's to handle
    os.write(reply_fd, b"ready\n")
    with os.fdopen(cmd_fd, "rb", buffering=0) as commands:
        for line in commands:
            command = json.loads(line)
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.close(reply_fd)
                commands.close()
                status = 1
                try:
                    status = child.run(command["values"], command["socket"], life_fd)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(status)  # never back into this loop
            os.write(reply_fd, f"{pid}\n".encode())


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:4]))
