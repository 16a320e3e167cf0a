#!/usr/bin/env bash
# Checks that the test command leaves out no module and no test package:
# every module of this repository (every go.mod) is in go.work, stands on
# its own (tidy, builds without the workspace), and each of its packages
# that has tests is matched by the test command's package patterns, which
# are this script's arguments:
#
#   bash .ci/modules.sh github.com/ssegateway/caddy-sse/...
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
	echo "usage: $0 <package patterns of the test command>" >&2
	exit 2
fi
has_tests='{{if or .TestGoFiles .XTestGoFiles}}{{.ImportPath}}{{end}}'
fail=0

in_workspace=$(go list -m -f '{{.Dir}}' | sort)
tested=$(go list -f "$has_tests" "$@" | sort -u)
modules=$(find . -name go.mod -not -path './.git/*' -not -path '*/node_modules/*' -not -path '*/testdata/*' |
	sed 's#/go.mod$##' | sort)
for m in $modules; do
	dir=$(cd "$m" && pwd)
	if ! grep -qxF "$dir" <<<"$in_workspace"; then
		echo "module $m is not in go.work (go work use $m)"
		fail=1
	fi
	if ! (cd "$m" && GOWORK=off go mod tidy -diff >/dev/null); then
		echo "module $m is not tidy (cd $m && go mod tidy)"
		fail=1
	fi
	for pkg in $(cd "$m" && GOWORK=off go list -f "$has_tests" ./...); do
		if ! grep -qxF "$pkg" <<<"$tested"; then
			echo "test package $pkg (module $m) is left out of: go test $*"
			fail=1
		fi
	done
done
if [ "$fail" -ne 0 ]; then
	exit 1
fi
echo "modules: ok ($(wc -w <<<"$modules") modules in go.work; the test command covers the $(wc -l <<<"$tested") packages with tests)"
