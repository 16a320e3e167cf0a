<?php
// Not part of what a tutorial writes: the proof suite's view into the
// server. sselog() prints one line ("SSELOG " + JSON) to the server's
// stderr; the test reads it to tell when a script stopped.
function sselog(array $fields): void
{
    $line = array_merge(['server' => 'php', 'pid' => getmypid(), 't' => microtime(true) * 1000], $fields);
    file_put_contents('php://stderr', 'SSELOG ' . json_encode($line) . "\n");
}

// The event interval, in microseconds, from SSE_INTERVAL_MS (tutorials
// sleep(1)).
function sse_interval(): int
{
    return (int) (getenv('SSE_INTERVAL_MS') ?: 1000) * 1000;
}

// The script's end, whatever ends it: with ignore_user_abort off (the
// default) PHP stops a script whose client is gone at its next output, and
// runs the shutdown functions.
function sse_log_end(string $k, int &$n): void
{
    register_shutdown_function(function () use ($k, &$n) {
        sselog(['ev' => 'close', 'k' => $k, 'method' => $_SERVER['REQUEST_METHOD'], 'n' => $n, 'aborted' => connection_aborted()]);
    });
}
