// Package headless starts the headless Chromium that the browser tests
// drive, the same way in every package: Debian's chromium, no sandbox (CI
// runs as root), and none of the background traffic that a machine without
// outside network would refuse.
package headless

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/chromedp/chromedp"
)

// Chromium returns the path of the Chromium binary. When there is none, the
// test fails under CI (CI=true), which must have installed it, and is
// skipped elsewhere, saying why.
func Chromium(t testing.TB) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	const why = "no chromium in PATH (Debian: apt-get install -y chromium)"
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and %s", why)
	}
	t.Skipf("skipped: %s (CI would fail)", why)
	return ""
}

// Allocator returns a chromedp allocator context that starts browser
// headless with a fresh profile in userDataDir; extra options are added
// (a window size, say).
func Allocator(browser, userDataDir string, extra ...chromedp.ExecAllocatorOption) (context.Context, context.CancelFunc) {
	opts := append([]chromedp.ExecAllocatorOption{
		chromedp.ExecPath(browser),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(userDataDir),
	}, extra...)
	return chromedp.NewExecAllocator(context.Background(), opts...)
}
