package caddysse

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// The Grafana dashboard in docs/ must import as is and ask only for what the
// module exports: every query's metrics, labels and label values are checked
// against the collectors initMetrics registers.

const dashboardPath = "docs/grafana-dashboard.json"

// exportedMetric is one of the module's metric families as a registry
// gathers it.
type exportedMetric struct {
	histogram bool
	labels    map[string]bool
}

// moduleMetrics provisions the module's collectors into a fresh registry and
// returns what it gathers, by family name.
func moduleMetrics(t *testing.T) map[string]exportedMetric {
	t.Helper()
	reg := prometheus.NewRegistry()
	if err := initMetrics(reg); err != nil {
		t.Fatal(err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]exportedMetric, len(families))
	for _, f := range families {
		m := exportedMetric{histogram: f.GetType().String() == "HISTOGRAM", labels: map[string]bool{}}
		for _, s := range f.GetMetric() {
			for _, l := range s.GetLabel() {
				m.labels[l.GetName()] = true
			}
		}
		out[f.GetName()] = m
	}
	return out
}

func labelValues[T ~string](values []T) []string {
	out := make([]string, len(values))
	for i, v := range values {
		out[i] = string(v)
	}
	return out
}

// emittedLabelValues are the values the module gives each label of its
// labelled metrics.
func emittedLabelValues() map[string]map[string][]string {
	return map[string]map[string][]string{
		"caddy_sse_streams_ended_total":   {"reason": labelValues(streamEndReasons)},
		"caddy_sse_streams_refused_total": {"reason": labelValues(refusalReasons)},
		"caddy_sse_upstream_quirks_total": {"quirk": labelValues(allQuirks)},
		"caddy_sse_shared_unshared_total": {"reason": labelValues(unsharedReasons)},
	}
}

// grafanaBuiltins are the variables Grafana defines for every query.
var grafanaBuiltins = []string{"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}

// dashboardChecker checks PromQL expressions against the module's metrics.
type dashboardChecker struct {
	metrics map[string]exportedMetric
	values  map[string]map[string][]string // family → label → values the module emits
	vars    map[string]bool                // Grafana variables a query may use
}

func newDashboardChecker(t *testing.T, variables ...string) *dashboardChecker {
	c := &dashboardChecker{metrics: moduleMetrics(t), values: emittedLabelValues(), vars: map[string]bool{}}
	for _, v := range append(slices.Clone(grafanaBuiltins), variables...) {
		c.vars[v] = true
	}
	return c
}

// resolve finds the family a series name belongs to: the name itself, or a
// histogram's _bucket, _sum or _count series.
func (c *dashboardChecker) resolve(name string) (family string, m exportedMetric, ok bool) {
	if m, ok := c.metrics[name]; ok && !m.histogram {
		return name, m, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, cut := strings.CutSuffix(name, suffix); cut {
			if m, ok := c.metrics[base]; ok && m.histogram {
				return base, m, true
			}
		}
	}
	return "", exportedMetric{}, false
}

// hasLabel says whether series name of family m carries label: its own
// labels, le on a histogram's buckets, and the target labels Prometheus adds.
func hasLabel(name string, m exportedMetric, label string) bool {
	switch {
	case m.labels[label], label == "instance", label == "job":
		return true
	case label == "le":
		return m.histogram && strings.HasSuffix(name, "_bucket")
	}
	return false
}

var grafanaVarRE = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// check returns what is wrong with expr: metrics the module does not export,
// labels they do not have, values of reason and quirk labels the module never
// emits, and Grafana variables the dashboard does not define.
func (c *dashboardChecker) check(expr string) []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	for _, m := range grafanaVarRE.FindAllStringSubmatch(expr, -1) {
		name := m[1] + m[2] + m[3]
		if !c.vars[name] {
			bad("variable $%s is not defined by the dashboard or Grafana", name)
		}
	}
	sels, groups, err := parsePromQL(expr)
	if err != nil {
		return append(errs, err)
	}
	if len(sels) == 0 {
		bad("names no metric")
	}
	for _, s := range sels {
		family, m, ok := c.resolve(s.name)
		if !ok {
			bad("%s is not a metric the module exports", s.name)
			continue
		}
		for _, mt := range s.matchers {
			if !hasLabel(s.name, m, mt.label) {
				bad("%s has no label %q", s.name, mt.label)
				continue
			}
			emitted, closed := c.values[family][mt.label]
			if !closed {
				continue
			}
			if strings.Contains(mt.value, "$") {
				bad("%s{%s%s%q}: a variable cannot be checked against the values the module emits", s.name, mt.label, mt.op, mt.value)
				continue
			}
			// A regex must be an alternation of values the module emits.
			alternatives := []string{mt.value}
			if mt.op == "=~" || mt.op == "!~" {
				alternatives = strings.Split(mt.value, "|")
			}
			for _, a := range alternatives {
				if !slices.Contains(emitted, a) {
					bad("%s{%s%s%q}: the module never emits %s %q", s.name, mt.label, mt.op, mt.value, mt.label, a)
				}
			}
		}
	}
	for _, g := range groups {
		for _, s := range sels {
			if s.at < g.from || s.at > g.to {
				continue
			}
			if _, m, ok := c.resolve(s.name); ok {
				for _, l := range g.labels {
					if !hasLabel(s.name, m, l) {
						bad("%s (%s): %s has no label %q", g.clause, strings.Join(g.labels, ", "), s.name, l)
					}
				}
			}
		}
	}
	return errs
}

// A small PromQL scanner: enough to find every selector with its matchers and
// every label list of by, without, on, ignoring, group_left and group_right.
// It rejects what it does not understand rather than skip it.

type promToken struct {
	kind byte   // 'i' identifier, 's' string (unquoted), 'n' number, 'r' range or subquery, 'p' punctuation
	text string //
}

type promMatcher struct{ label, op, value string }

type promSelector struct {
	name     string
	at       int // token index
	matchers []promMatcher
}

// promGrouping is a label list and the tokens whose selectors must have its
// labels.
type promGrouping struct {
	clause   string
	labels   []string
	from, to int
}

var (
	promAggregations = map[string]bool{"sum": true, "min": true, "max": true, "avg": true, "group": true,
		"stddev": true, "stdvar": true, "count": true, "count_values": true, "bottomk": true, "topk": true,
		"quantile": true, "limitk": true, "limit_ratio": true}
	promKeywords = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true,
		"group_left": true, "group_right": true, "bool": true, "offset": true, "and": true, "or": true,
		"unless": true, "atan2": true, "inf": true, "nan": true, "start": true, "end": true}
)

func isIdentStart(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

func isIdentChar(c byte) bool {
	return isIdentStart(c) || c >= '0' && c <= '9'
}

func lexPromQL(expr string) ([]promToken, error) {
	var toks []promToken
	for i := 0; i < len(expr); {
		c := expr[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#':
			for i < len(expr) && expr[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(expr) && expr[j] != c {
				if expr[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			if j >= len(expr) {
				return nil, fmt.Errorf("unterminated string at %d", i)
			}
			s := expr[i+1 : j]
			switch {
			case c == '"':
				var err error
				if s, err = strconv.Unquote(expr[i : j+1]); err != nil {
					return nil, fmt.Errorf("string at %d: %v", i, err)
				}
			case c == '\'' && strings.Contains(s, `\`):
				return nil, fmt.Errorf("escapes in a single-quoted string at %d: use double quotes", i)
			}
			toks = append(toks, promToken{'s', s})
			i = j + 1
		case c == '[':
			j := strings.IndexByte(expr[i:], ']')
			if j < 0 {
				return nil, fmt.Errorf("unterminated range at %d", i)
			}
			toks = append(toks, promToken{'r', expr[i : i+j+1]})
			i += j + 1
		case isIdentStart(c):
			j := i
			for j < len(expr) && (isIdentChar(expr[j]) || expr[j] == ':') {
				j++
			}
			toks = append(toks, promToken{'i', expr[i:j]})
			i = j
		case c >= '0' && c <= '9' || c == '.':
			j := i + 1
			for j < len(expr) && (isIdentChar(expr[j]) || expr[j] == '.' ||
				(expr[j] == '+' || expr[j] == '-') && (expr[j-1] == 'e' || expr[j-1] == 'E')) {
				j++
			}
			toks = append(toks, promToken{'n', expr[i:j]})
			i = j
		default:
			if i+1 < len(expr) {
				switch two := expr[i : i+2]; two {
				case "!=", "=~", "!~", "==", ">=", "<=":
					toks = append(toks, promToken{'p', two})
					i += 2
					continue
				}
			}
			if !strings.ContainsRune("(){},=+-*/%^<>@", rune(c)) {
				return nil, fmt.Errorf("unexpected %q at %d", c, i)
			}
			toks = append(toks, promToken{'p', string(c)})
			i++
		}
	}
	return toks, nil
}

func parsePromQL(expr string) (sels []promSelector, groups []promGrouping, err error) {
	toks, err := lexPromQL(expr)
	if err != nil {
		return nil, nil, err
	}
	// Matching brackets.
	match := make([]int, len(toks))
	var open []int
	for i, t := range toks {
		if t.kind != 'p' {
			continue
		}
		switch t.text {
		case "(", "{":
			open = append(open, i)
		case ")", "}":
			want := map[string]string{")": "(", "}": "{"}[t.text]
			if len(open) == 0 || toks[open[len(open)-1]].text != want {
				return nil, nil, fmt.Errorf("unbalanced %q", t.text)
			}
			o := open[len(open)-1]
			open = open[:len(open)-1]
			match[o], match[i] = i, o
		}
	}
	if len(open) > 0 {
		return nil, nil, fmt.Errorf("unclosed %q", toks[open[len(open)-1]].text)
	}
	is := func(i int, kind byte, text string) bool {
		return i < len(toks) && toks[i].kind == kind && toks[i].text == text
	}
	isGroupingClause := func(i int) bool { return is(i, 'i', "by") || is(i, 'i', "without") }
	// labelList reads "(a, b)" from toks[at] and returns the index of ")".
	labelList := func(at int) ([]string, int, error) {
		if !is(at, 'p', "(") {
			return nil, 0, fmt.Errorf("%s without a label list", toks[at-1].text)
		}
		var labels []string
		for i := at + 1; i < match[at]; i++ {
			if toks[i].kind != 'i' {
				return nil, 0, fmt.Errorf("%s (...): unexpected %q", toks[at-1].text, toks[i].text)
			}
			labels = append(labels, toks[i].text)
			if i+1 < match[at] && !is(i+1, 'p', ",") {
				return nil, 0, fmt.Errorf("%s (...): expected a comma after %q", toks[at-1].text, toks[i].text)
			}
			i++
		}
		return labels, match[at], nil
	}
	skip := map[int]bool{} // label lists after an aggregation's arguments
	for i := 0; i < len(toks); i++ {
		t := toks[i]
		switch {
		case skip[i]:
		case is(i, 'p', "{"):
			return nil, nil, fmt.Errorf("a selector without a metric name")
		case t.kind != 'i':
		case t.text == "by" || t.text == "without":
			return nil, nil, fmt.Errorf("%s outside an aggregation", t.text)
		case t.text == "on" || t.text == "ignoring" || t.text == "group_left" || t.text == "group_right":
			if !is(i+1, 'p', "(") && (t.text == "group_left" || t.text == "group_right") {
				continue
			}
			labels, end, err := labelList(i + 1)
			if err != nil {
				return nil, nil, err
			}
			// Both sides of the operation must have them: check the whole expression.
			groups = append(groups, promGrouping{t.text, labels, 0, len(toks)})
			i = end
		case promKeywords[t.text]:
		case promAggregations[t.text] && isGroupingClause(i+1): // sum by (l) (...)
			labels, end, err := labelList(i + 2)
			if err != nil {
				return nil, nil, err
			}
			if !is(end+1, 'p', "(") {
				return nil, nil, fmt.Errorf("%s by (...) without arguments", t.text)
			}
			groups = append(groups, promGrouping{toks[i+1].text, labels, end + 1, match[end+1]})
			i = end
		case is(i+1, 'p', "("): // a function, or an aggregation: sum (...) by (l)
			if closing := match[i+1]; promAggregations[t.text] && isGroupingClause(closing+1) {
				labels, end, err := labelList(closing + 2)
				if err != nil {
					return nil, nil, err
				}
				groups = append(groups, promGrouping{toks[closing+1].text, labels, i + 1, closing})
				for j := closing + 1; j <= end; j++ {
					skip[j] = true
				}
			}
		default: // a metric
			sel := promSelector{name: t.text, at: i}
			if is(i+1, 'p', "{") {
				closing := match[i+1]
				for j := i + 2; j < closing; j += 4 {
					if toks[j].kind != 'i' || j+2 >= closing || toks[j+1].kind != 'p' || toks[j+2].kind != 's' {
						return nil, nil, fmt.Errorf("%s{...}: expected label, operator and string at %q", t.text, toks[j].text)
					}
					op := toks[j+1].text
					if op != "=" && op != "!=" && op != "=~" && op != "!~" {
						return nil, nil, fmt.Errorf("%s{...}: unexpected operator %q", t.text, op)
					}
					sel.matchers = append(sel.matchers, promMatcher{toks[j].text, op, toks[j+2].text})
					if j+3 < closing && !is(j+3, 'p', ",") {
						return nil, nil, fmt.Errorf("%s{...}: expected a comma after %s%s%q", t.text, toks[j].text, op, toks[j+2].text)
					}
				}
				i = closing
			}
			sels = append(sels, sel)
		}
	}
	return sels, groups, nil
}

// jsonObjects calls fn for every object in v, with its path.
func jsonObjects(v any, path string, fn func(path string, obj map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		fn(path, v)
		for k, e := range v {
			jsonObjects(e, path+"."+k, fn)
		}
	case []any:
		for i, e := range v {
			jsonObjects(e, fmt.Sprintf("%s[%d]", path, i), fn)
		}
	}
}

func loadDashboard(t *testing.T) (raw []byte, dash map[string]any) {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	return raw, dash
}

// dashboardPanels returns the dashboard's panels, those of rows included.
func dashboardPanels(dash map[string]any) []map[string]any {
	var out []map[string]any
	var walk func(v any)
	walk = func(v any) {
		list, _ := v.([]any)
		for _, p := range list {
			if p, ok := p.(map[string]any); ok {
				out = append(out, p)
				walk(p["panels"])
			}
		}
	}
	walk(dash["panels"])
	return out
}

func dashboardVariables(dash map[string]any) map[string]map[string]any {
	out := map[string]map[string]any{}
	templating, _ := dash["templating"].(map[string]any)
	list, _ := templating["list"].([]any)
	for _, v := range list {
		if v, ok := v.(map[string]any); ok {
			name, _ := v["name"].(string)
			out[name] = v
		}
	}
	return out
}

// The dashboard imports as is: it asks for its Prometheus data source on
// import and names no data source of anyone's Grafana.
func TestDashboardImportsAsIs(t *testing.T) {
	raw, dash := loadDashboard(t)

	inputs, _ := dash["__inputs"].([]any)
	declared := map[string]bool{}
	for _, in := range inputs {
		in, _ := in.(map[string]any)
		name, _ := in["name"].(string)
		declared[name] = true
		if in["type"] != "datasource" || in["pluginId"] != "prometheus" {
			t.Errorf("__inputs: %s is %v %v, want a prometheus datasource", name, in["type"], in["pluginId"])
		}
	}
	if !declared["DS_PROMETHEUS"] {
		t.Error("__inputs: no DS_PROMETHEUS")
	}
	used := map[string]bool{}
	for _, m := range regexp.MustCompile(`\$\{(DS_\w+)\}`).FindAllStringSubmatch(string(raw), -1) {
		used[m[1]] = true
		if !declared[m[1]] {
			t.Errorf("${%s} is not in __inputs", m[1])
		}
	}
	for name := range declared {
		if !used[name] {
			t.Errorf("__inputs: %s is never used", name)
		}
	}

	// The data source variable starts at the data source chosen on import;
	// everything else goes through the variable.
	vars := dashboardVariables(dash)
	ds := vars["datasource"]
	if ds == nil || ds["type"] != "datasource" || ds["query"] != "prometheus" {
		t.Fatalf("templating: no prometheus datasource variable named datasource: %v", ds)
	}
	if current, _ := ds["current"].(map[string]any); current["value"] != "${DS_PROMETHEUS}" {
		t.Errorf("templating: datasource starts at %v, want ${DS_PROMETHEUS}", current["value"])
	}
	jsonObjects(dash, "", func(path string, obj map[string]any) {
		v, ok := obj["datasource"]
		if !ok {
			return
		}
		d, _ := v.(map[string]any)
		if d["type"] != "prometheus" || d["uid"] != "${datasource}" {
			t.Errorf("%s.datasource is %v, want {type: prometheus, uid: ${datasource}}", path, v)
		}
	})

	if v, _ := dash["schemaVersion"].(float64); v < 36 {
		t.Errorf("schemaVersion %v: want 36 or later (data sources by uid)", dash["schemaVersion"])
	}
	if dash["id"] != nil {
		t.Errorf("id is %v, want null: an import assigns it", dash["id"])
	}
	ids := map[float64]bool{}
	for _, p := range dashboardPanels(dash) {
		id, _ := p["id"].(float64)
		if ids[id] {
			t.Errorf("panel %q: id %v used twice", p["title"], p["id"])
		}
		ids[id] = true
		if _, ok := p["gridPos"].(map[string]any); !ok {
			t.Errorf("panel %q has no gridPos", p["title"])
		}
	}
}

// Every query names metrics the module exports, with labels they have and
// label values the module emits, and follows the instance variable.
func TestDashboardQueries(t *testing.T) {
	_, dash := loadDashboard(t)
	vars := dashboardVariables(dash)
	var names []string
	for name := range vars {
		names = append(names, name)
	}
	c := newDashboardChecker(t, names...)

	onDashboard := map[string]bool{}
	queries := 0
	for _, p := range dashboardPanels(dash) {
		if p["type"] == "row" {
			continue
		}
		targets, _ := p["targets"].([]any)
		if len(targets) == 0 {
			t.Errorf("panel %q has no queries", p["title"])
		}
		for _, target := range targets {
			target, _ := target.(map[string]any)
			expr, _ := target["expr"].(string)
			where := fmt.Sprintf("panel %q, query %v", p["title"], target["refId"])
			if expr == "" {
				t.Errorf("%s: no expr", where)
				continue
			}
			queries++
			for _, err := range c.check(expr) {
				t.Errorf("%s: %v\n\t%s", where, err, expr)
			}
			sels, _, err := parsePromQL(expr)
			if err != nil {
				continue // reported by check
			}
			for _, s := range sels {
				if family, _, ok := c.resolve(s.name); ok {
					onDashboard[family] = true
				}
				if !slices.Contains(s.matchers, promMatcher{"instance", "=~", "$instance"}) {
					t.Errorf("%s: %s does not follow the instance variable (instance=~\"$instance\")", where, s.name)
				}
			}
		}
	}
	if queries == 0 {
		t.Fatal("no queries found")
	}
	t.Logf("%d queries checked against %d metrics", queries, len(c.metrics))

	for name, m := range c.metrics {
		if !onDashboard[name] {
			t.Errorf("%s is on no panel", name)
		}
		// Every label the module gives a metric has its emitted values here.
		for label := range m.labels {
			if _, ok := c.values[name][label]; !ok {
				t.Errorf("%s{%s}: the values the module emits are not in emittedLabelValues", name, label)
			}
		}
	}
}

// The instance variable lists the instances that export the module's metrics.
func TestDashboardVariables(t *testing.T) {
	_, dash := loadDashboard(t)
	c := newDashboardChecker(t)
	instance := dashboardVariables(dash)["instance"]
	if instance == nil || instance["type"] != "query" {
		t.Fatalf("templating: no query variable named instance: %v", instance)
	}
	query := instance["query"]
	if q, ok := query.(map[string]any); ok {
		query = q["query"]
	}
	want := "label_values(caddy_sse_streams_active, instance)"
	if query != want || instance["definition"] != want {
		t.Errorf("instance: query %v, definition %v, want %s", query, instance["definition"], want)
	}
	m := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`).FindStringSubmatch(want)
	for _, err := range c.check(fmt.Sprintf("sum by (%s) (%s)", m[2], m[1])) {
		t.Errorf("instance: %v", err)
	}
}

// The checks catch what they are for.
func TestDashboardCheckerCatchesMistakes(t *testing.T) {
	c := newDashboardChecker(t, "instance")
	good := []string{
		`sum by (reason) (rate(caddy_sse_streams_ended_total{instance=~"$instance"}[$__rate_interval]))`,
		`histogram_quantile(0.99, sum(rate(caddy_sse_teardown_seconds_bucket[5m])) by (le))`,
		`sum(rate(caddy_sse_teardown_seconds_sum[5m])) / sum(rate(caddy_sse_teardown_seconds_count[5m]))`,
		`caddy_sse_upstream_quirks_total{quirk!="buffered", job="caddy"}`,
		`caddy_sse_streams_refused_total{reason=~"max_streams|upstream_status"}`,
		`sum(caddy_sse_shared_subscribers) / on (instance) sum by (instance) (caddy_sse_shared_upstreams_open)`,
	}
	for _, expr := range good {
		if errs := c.check(expr); len(errs) > 0 {
			t.Errorf("%s: %v", expr, errs)
		}
	}
	bad := map[string]string{
		`sum(rate(caddy_sse_streams_endd_total[5m]))`: "not a metric",
		`up{job="caddy"}`:                                                                "not a metric",
		`rate(caddy_sse_events_total_bucket[5m])`:                                        "not a metric",
		`rate(caddy_sse_teardown_seconds[5m])`:                                           "not a metric",
		`caddy_sse_streams_ended_total{route="a"}`:                                       "no label",
		`sum by (quirk) (caddy_sse_streams_ended_total)`:                                 "no label",
		`sum(caddy_sse_streams_ended_total) without (host)`:                              "no label",
		`sum by (le) (rate(caddy_sse_teardown_seconds_count[5m]))`:                       "no label",
		`caddy_sse_streams_ended_total{reason="upstream_status"}`:                        "never emits",
		`caddy_sse_streams_refused_total{reason=~"max_streams|max_stream"}`:              "never emits",
		`caddy_sse_streams_refused_total{reason=~"upstream_.*"}`:                         "never emits",
		`caddy_sse_upstream_quirks_total{quirk="chunked"}`:                               "never emits",
		`caddy_sse_shared_unshared_total{reason="$reason"}`:                              "not defined",
		`caddy_sse_events_total{instance=~"$host"}`:                                      "not defined",
		`sum(caddy_sse_bytes_total`:                                                      "unclosed",
		`{__name__="caddy_sse_bytes_total"}`:                                             "without a metric name",
		`sum(caddy_sse_shared_subscribers) / on (route) caddy_sse_shared_upstreams_open`: "no label",
		`1`: "names no metric",
	}
	for expr, want := range bad {
		errs := c.check(expr)
		if !slices.ContainsFunc(errs, func(err error) bool { return strings.Contains(err.Error(), want) }) {
			t.Errorf("%s: got %v, want an error about %q", expr, errs, want)
		}
	}
}
