"""A naive Flask SSE endpoint, written the way tutorials write one: a
generator that yields an event and sleeps, forever, returned as a
text/event-stream response. No heartbeat, no Last-Event-ID, never ends.

Run on gunicorn's sync workers (one request per worker at a time):

    gunicorn --workers 2 --bind 127.0.0.1:8000 app:app

For the proof suite it takes its event interval from SSE_INTERVAL_MS and
prints one line per stream opened and closed to stdout ("SSELOG " + JSON),
so the test can tell when a worker let go of a stream: gunicorn closes the
generator (GeneratorExit at its yield) once a write to the client fails.
Each event's data carries the moment it was written (t, Unix milliseconds).
"""

import json
import os
import sys
import time

from flask import Flask, Response, request

app = Flask(__name__)
INTERVAL = int(os.environ.get("SSE_INTERVAL_MS", "1000")) / 1000


def sselog(**fields):
    line = {"server": "flask", "pid": os.getpid(), "t": time.time() * 1000, **fields}
    print("SSELOG " + json.dumps(line), file=sys.stdout, flush=True)


@app.route("/events")
def events():
    k = request.args.get("k", "")
    method = request.method

    def stream():
        sselog(ev="open", k=k, method=method)
        n = 0
        why = "returned"
        try:
            while True:
                n += 1
                yield "data: " + json.dumps({"n": n, "t": time.time() * 1000, "k": k}) + "\n\n"
                time.sleep(INTERVAL)
        except GeneratorExit:
            why = "GeneratorExit"
            raise
        finally:
            sselog(ev="close", k=k, method=method, n=n, why=why)

    return Response(stream(), mimetype="text/event-stream")


# Another route of the same server, to see whether streams starve it.
@app.route("/hello")
def hello():
    return "hello\n"
