<?php
// The PHP SSE tutorial's script: echo an event, ob_flush(), flush(),
// sleep, forever. No heartbeat, no Last-Event-ID, never ends.
require __DIR__ . '/sselog.php';

header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');

$k = $_GET['k'] ?? '';
$n = 0;
sse_log_end($k, $n);
sselog(['ev' => 'open', 'k' => $k, 'method' => $_SERVER['REQUEST_METHOD']]);

while (true) {
    $n++;
    echo 'data: ' . json_encode(['n' => $n, 't' => microtime(true) * 1000, 'k' => $k]) . "\n\n";
    ob_flush();
    flush();
    usleep(sse_interval());
}
