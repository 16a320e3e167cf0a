// A second real client for the proof suite: Node's `eventsource` package,
// driven by the Go test TestNodeEventSource over stdin and stdout.
//
// Commands, one JSON object per line on stdin:
//   {"cmd": "open", "id": "a", "url": "http://...", "types": ["tick", "bye"], "closeType": "bye"}
//   {"cmd": "close", "id": "a"}
// Reports, one JSON object per line on stdout, for every open, error,
// message, listed event type, and close of each EventSource:
//   {"id": "a", "kind": "open|error|event|close|closed", "type", "data", "id_": lastEventId, "ready", "t"}
// "close" is the gateway's close event (closeType); "closed" confirms that
// close() was called. The process ends when stdin ends.
import { EventSource } from "eventsource";
import { createInterface } from "node:readline";

const sources = new Map();

function report(id, kind, source, e) {
  process.stdout.write(JSON.stringify({
    source: id,
    kind,
    type: e?.type ?? "",
    data: e?.data ?? "",
    id: e?.lastEventId ?? "",
    ready: source?.readyState ?? -1,
    t: performance.now(),
  }) + "\n");
}

function open({ id, url, types = [], closeType = "" }) {
  const source = new EventSource(url);
  sources.set(id, source);
  source.addEventListener("open", (e) => report(id, "open", source, e));
  source.addEventListener("error", (e) => report(id, "error", source, e));
  source.addEventListener("message", (e) => report(id, "event", source, e));
  for (const type of types) {
    source.addEventListener(type, (e) => report(id, type === closeType ? "close" : "event", source, e));
  }
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "open") {
    open(command);
  } else if (command.cmd === "close") {
    const source = sources.get(command.id);
    source?.close();
    sources.delete(command.id);
    report(command.id, "closed", source, null);
  }
});
lines.on("close", () => {
  for (const source of sources.values()) source.close();
  process.exit(0);
});
