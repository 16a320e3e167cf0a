<?php
// The same script with the common mistake: flush() without ob_flush().
// Under the production php.ini (output_buffering = 4096) the events sit in
// PHP's output buffer until 4 KiB have piled up. SSE_PAD_BYTES pads each
// event's data so that a test sees a few bursts in seconds rather than one
// a minute.
require __DIR__ . '/sselog.php';

header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');

$k = $_GET['k'] ?? '';
$pad = str_repeat('x', (int) (getenv('SSE_PAD_BYTES') ?: 0));
$n = 0;
sse_log_end($k, $n);
sselog(['ev' => 'open', 'k' => $k, 'method' => $_SERVER['REQUEST_METHOD']]);

while (true) {
    $n++;
    echo 'data: ' . json_encode(['n' => $n, 't' => microtime(true) * 1000, 'k' => $k, 'pad' => $pad]) . "\n\n";
    flush();
    usleep(sse_interval());
}
