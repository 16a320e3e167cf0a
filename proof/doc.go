// Package proof holds the evidence that the sse handler survives what
// production throws at it: real clients (headless Chromium and Node's
// eventsource package), HTTP/1.1, HTTP/2 and HTTP/3, broken upstreams,
// clients that stop reading or vanish, and churn. Everything lives in the
// package's tests; this file only gives the package a name and a home for
// its documentation.
//
// Each test runs a real Caddy in this process, configured from a Caddyfile,
// with the sse handler in front of reverse_proxy, and an upstream of its
// own on loopback that records when it sees each request's connection end,
// which is how the tests tell that the gateway released it.
//
// Run with SSE_RELIABILITY_REPORT set to a file path to have the suite
// write its report (docs/reliability.md in the repository) from the
// figures of the run:
//
//	SSE_RELIABILITY_REPORT=$PWD/docs/reliability.md go test -race ./proof
//
// Tests that need a tool (chromium, node and the npm packages of proof/js,
// root with iproute2 for network namespaces) fail when CI=true and the tool
// is missing, and are skipped, saying why, on a developer machine.
package proof
