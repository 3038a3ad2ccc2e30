"""A rank program for launcher tests: `python tests/rankprog.py MODE [ARGS] TOKEN`.

TOKEN is unique per test so leftover processes can be found by command line.
Modes:
  sleep                       print 'up' and sleep
  fail RANK CODE DELAY        rank RANK exits CODE after DELAY s; others sleep
  signal RANK SIG DELAY       rank RANK kills itself with SIG after DELAY s
  stop RANK DELAY             rank RANK SIGSTOPs itself after DELAY s
  ready-except RANK           every rank but RANK reports ready; all sleep
  env VAR...                  print VAR=value for each VAR, exit 0
  stdin                       print what arrives on stdin, exit 0
  collectives                 mx.distributed all_sum / all_gather, print results and SSH_CONNECTION
"""

import os
import signal
import sys
import time

mode, args, token = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
rank = int(os.environ.get("EXOLAUNCH_RANK", "0"))


def sleep_forever():
    print(f"rank {rank} up", flush=True)
    time.sleep(3600)


if mode == "sleep":
    sleep_forever()
elif mode in ("fail", "signal"):
    who, value, delay = int(args[0]), int(args[1]), float(args[2])
    if rank == who:
        time.sleep(delay)
        if mode == "fail":
            sys.exit(value)
        os.kill(os.getpid(), value)
    sleep_forever()
elif mode == "stop":
    if rank == int(args[0]):
        time.sleep(float(args[1]))
        os.kill(os.getpid(), signal.SIGSTOP)
    sleep_forever()
elif mode == "ready-except":
    from launcher.rankapi import ready

    if rank != int(args[0]):
        ready()
    sleep_forever()
elif mode == "env":
    for var in args:
        print(f"{var}={os.environ.get(var, '<unset>')}")
elif mode == "stdin":
    print(f"stdin={sys.stdin.read()!r}")
elif mode == "collectives":
    import mlx.core as mx

    from launcher.rankapi import ready

    g = mx.distributed.init(strict=True, backend=os.environ["EXOLAUNCH_BACKEND"])
    ready()
    s = mx.distributed.all_sum(mx.array([float(g.rank() + 1)]))
    a = mx.distributed.all_gather(mx.array([float(g.rank())]))
    mx.eval(s, a)
    conn = os.environ.get("SSH_CONNECTION", "none").split()
    print(f"size={g.size()} sum={s.item():g} gather={[int(v) for v in a.tolist()]} "
          f"server={conn[2] if len(conn) > 2 else 'none'}", flush=True)
else:
    sys.exit(f"unknown mode {mode}")
