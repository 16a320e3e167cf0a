package caddysse

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	half := 0.5
	zero := 0.0
	for _, tc := range []struct {
		name  string
		input string
		want  Handler
	}{
		{"bare", `sse`, Handler{}},
		{"empty block", "sse {\n}", Handler{}},
		{"all options", `sse {
			heartbeat 20s
			heartbeat_text "keep alive"
			idle_timeout 2m
			max_lifetime 1h
			lifetime_jitter 0.5
			retry 1500ms
			close_event bye
			close_grace 3s
			write_timeout 30s
			drain_window 1m
			max_streams 1000
			max_streams_per_client 4
			last_event_id_query lastEventId
			refuse_with status
			retry_statuses 5xx 429 404
			max_stream_rate 50
			retry_bounds 1s 1m
		}`, Handler{
			Heartbeat:           caddy.Duration(20 * time.Second),
			HeartbeatText:       "keep alive",
			IdleTimeout:         caddy.Duration(2 * time.Minute),
			MaxLifetime:         caddy.Duration(time.Hour),
			LifetimeJitter:      &half,
			Retry:               caddy.Duration(1500 * time.Millisecond),
			CloseEvent:          "bye",
			CloseGrace:          caddy.Duration(3 * time.Second),
			WriteTimeout:        caddy.Duration(30 * time.Second),
			DrainWindow:         caddy.Duration(time.Minute),
			MaxStreams:          1000,
			MaxStreamsPerClient: 4,
			LastEventIDQuery:    "lastEventId",
			RefuseWith:          "status",
			RetryStatuses:       []string{"5xx", "429", "404"},
			MaxStreamRate:       50,
			RetryBounds:         []caddy.Duration{caddy.Duration(time.Second), caddy.Duration(time.Minute)},
		}},
		{"retry statuses off", "sse {\nretry_statuses off\n}", Handler{RetryStatuses: []string{"off"}}},
		{"rate per second", "sse {\nmax_stream_rate 5/s\n}", Handler{MaxStreamRate: 5}},
		{"heartbeat off", "sse {\nheartbeat off\n}", Handler{Heartbeat: -1}},
		{"write_timeout off", "sse {\nwrite_timeout off\n}", Handler{WriteTimeout: -1}},
		{"drain_window off", "sse {\ndrain_window off\n}", Handler{DrainWindow: -1}},
		{"zero jitter", "sse {\nlifetime_jitter 0\n}", Handler{LifetimeJitter: &zero}},
		{"days", "sse {\nmax_lifetime 1d\n}", Handler{MaxLifetime: caddy.Duration(24 * time.Hour)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Handler
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		// want are substrings the error must contain: the option and the
		// line it is on.
		want []string
	}{
		{"stray argument", "sse extra", []string{`sse: want sse [<matcher>] [{ <options> }], got the argument "extra"`, "Testfile:1"}},
		{"unknown option", "sse {\n  heartbeat 1s\n  hartbeat 2s\n}", []string{"hartbeat", "Testfile:3"}},
		{"unknown option alone", "sse {\n  hartbeat\n}", []string{`unrecognized sse option "hartbeat"`, "Testfile:2"}},
		{"duplicate", "sse {\n  retry 1s\n  retry 2s\n}", []string{"retry", "more than once", "Testfile:3"}},
		{"missing value", "sse {\n  idle_timeout\n}", []string{"idle_timeout: want idle_timeout <duration>", "Testfile:2"}},
		{"retry_statuses empty", "sse {\n  retry_statuses\n}", []string{"retry_statuses: want retry_statuses <code|4xx|5xx>...|off", "Testfile:2"}},
		{"retry_statuses 200", "sse {\n  retry 1s\n  retry_statuses 5xx 200\n}", []string{"retry_statuses", "\"200\"", "Testfile:3"}},
		{"retry_statuses off and more", "sse {\n  retry_statuses off 502\n}", []string{"retry_statuses", "Testfile:2"}},
		{"max_stream_rate 0", "sse {\n  max_stream_rate 0\n}", []string{"max_stream_rate", "Testfile:2"}},
		{"retry_bounds one", "sse {\n  retry_bounds 1s\n}", []string{"retry_bounds: want retry_bounds <min> <max>", "Testfile:2"}},
		{"retry_bounds three", "sse {\n  retry_bounds 1s 2s 3s\n}", []string{"retry_bounds: want retry_bounds <min> <max>", "Testfile:2"}},
		{"retry_bounds reversed", "sse {\n  retry 1s\n  retry_bounds 1m 1s\n}", []string{"retry_bounds", "above", "Testfile:3"}},
		{"retry_bounds bad", "sse {\n  retry_bounds 1s soon\n}", []string{"retry_bounds", "soon", "Testfile:2"}},
		{"refuse_with", "sse {\n  retry 1s\n  refuse_with 503\n}", []string{"refuse_with", "stream or status", "Testfile:3"}},
		{"extra value", "sse {\n  idle_timeout 1s 2s\n}", []string{"idle_timeout: want idle_timeout <duration>", "Testfile:2"}},
		{"heartbeat extra", "sse {\n  heartbeat 1s off\n}", []string{"heartbeat: want heartbeat <duration>|off", "Testfile:2"}},
		{"unparsable duration", "sse {\n  max_lifetime soon\n}", []string{"max_lifetime", "soon", "Testfile:2"}},
		{"negative duration", "sse {\n  write_timeout -1s\n}", []string{"write_timeout", "negative", "Testfile:2"}},
		{"negative heartbeat", "sse {\n  heartbeat -5s\n}", []string{"heartbeat", "negative", "Testfile:2"}},
		{"jitter too big", "sse {\n\n  lifetime_jitter 1.5\n}", []string{"lifetime_jitter", "Testfile:3"}},
		{"jitter negative", "sse {\n  lifetime_jitter -0.1\n}", []string{"lifetime_jitter", "Testfile:2"}},
		{"jitter not a number", "sse {\n  lifetime_jitter lots\n}", []string{"lifetime_jitter", "Testfile:2"}},
		{"newline in close_event", "sse {\n  close_event \"a\nb\"\n}", []string{"close_event", "CR or LF"}},
		{"zero max_streams", "sse {\n  max_streams 0\n}", []string{"max_streams", "Testfile:2"}},
		{"bad max_streams_per_client", "sse {\n  max_streams_per_client two\n}", []string{"max_streams_per_client", "two", "Testfile:2"}},
		{"negative drain_window", "sse {\n  drain_window -1s\n}", []string{"drain_window", "Testfile:2"}},
		// 0 could mean off or the default: the error says what to write.
		{"zero heartbeat", "sse {\n  heartbeat 0\n}", []string{`heartbeat: 0 is ambiguous; write "off" to disable it or a positive duration`, "Testfile:2"}},
		{"zero write_timeout", "sse {\n  retry 1s\n  write_timeout 0s\n}", []string{`write_timeout: 0 is ambiguous; write "off"`, "Testfile:3"}},
		{"zero drain_window", "sse {\n  drain_window 0ms\n}", []string{`drain_window: 0 is ambiguous; write "off"`, "Testfile:2"}},
		{"cr in heartbeat_text", "sse {\n  heartbeat_text \"a\rb\"\n}", []string{"heartbeat_text", "CR or LF", "Testfile:2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error for %q", tc.input)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestCaddyfileSyntaxErrors checks that an option given without its
// value, or with one too many, is refused with what it takes.
func TestCaddyfileSyntaxErrors(t *testing.T) {
	for option, want := range map[string]string{
		"heartbeat":              "heartbeat <duration>|off",
		"heartbeat_text":         "heartbeat_text <text>",
		"idle_timeout":           "idle_timeout <duration>",
		"max_lifetime":           "max_lifetime <duration>",
		"lifetime_jitter":        "lifetime_jitter <fraction 0..1>",
		"retry":                  "retry <duration>",
		"close_event":            "close_event <event type>",
		"close_grace":            "close_grace <duration>",
		"write_timeout":          "write_timeout <duration>|off",
		"drain_window":           "drain_window <duration>|off",
		"max_streams":            "max_streams <n>",
		"max_streams_per_client": "max_streams_per_client <n>",
		"last_event_id_query":    "last_event_id_query <param>",
		"refuse_with":            "refuse_with stream|status",
		"retry_statuses":         "retry_statuses <code|4xx|5xx>...|off",
		"max_stream_rate":        "max_stream_rate <n per second>",
		"retry_bounds":           "retry_bounds <min> <max>",
	} {
		for _, args := range []string{"", " 1 2 3"} {
			if option == "retry_statuses" && args != "" {
				continue // takes any number
			}
			input := "sse {\n  retry 1s\n  " + option + args + "\n}"
			if option == "retry" {
				input = "sse {\n  close_grace 1s\n  " + option + args + "\n}"
			}
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
			if err == nil || !strings.Contains(err.Error(), option+": want "+want) || !strings.Contains(err.Error(), "Testfile:3") {
				t.Errorf("%q: got %v, want %q at Testfile:3", option+args, err, option+": want "+want)
			}
		}
	}
}

// TestValidateJSON checks that JSON configs, which bypass the Caddyfile
// parser, are refused for the same values.
func TestValidateJSON(t *testing.T) {
	big, nan := 2.0, -0.5
	for _, tc := range []struct {
		name string
		h    Handler
		want string
	}{
		{"negative idle", Handler{IdleTimeout: -1}, "idle_timeout"},
		{"negative lifetime", Handler{MaxLifetime: -1}, "max_lifetime"},
		{"negative retry", Handler{Retry: -1}, "retry"},
		{"negative grace", Handler{CloseGrace: -1}, "close_grace"},
		{"jitter over 1", Handler{LifetimeJitter: &big}, "lifetime_jitter"},
		{"jitter under 0", Handler{LifetimeJitter: &nan}, "lifetime_jitter"},
		{"newline in heartbeat text", Handler{HeartbeatText: "a\nb"}, "heartbeat_text"},
		{"cr in close event", Handler{CloseEvent: "a\rb"}, "close_event"},
		{"negative max streams", Handler{MaxStreams: -1}, "max_streams"},
		{"negative per-client max", Handler{MaxStreamsPerClient: -1}, "max_streams_per_client"},
		{"unknown refusal", Handler{RefuseWith: "503"}, "refuse_with"},
		{"retry status out of range", Handler{RetryStatuses: []string{"302"}}, "retry_statuses"},
		{"negative stream rate", Handler{MaxStreamRate: -1}, "max_stream_rate"},
		{"retry bounds reversed", Handler{RetryBounds: []caddy.Duration{2, 1}}, "retry_bounds"},
		{"retry bounds alone", Handler{RetryBounds: []caddy.Duration{2}}, "retry_bounds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.h.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want an error about %s", err, tc.want)
			}
		})
	}
	if err := (&Handler{Heartbeat: -1, WriteTimeout: -1, DrainWindow: -1}).Validate(); err != nil {
		t.Fatalf("a negative heartbeat, write_timeout or drain_window means off, got %v", err)
	}
}

// TestHandlerJSON checks the JSON of heartbeat, write_timeout and
// drain_window, read as Caddy reads a module's config: left out is the
// default, "off" (or a negative duration) is off, and an explicit 0 is
// refused with the same words as in the Caddyfile.
func TestHandlerJSON(t *testing.T) {
	off := durationOff
	for _, tc := range []struct {
		name, json string
		// want is the three options as read, or wantErr the error's words.
		want    [3]caddy.Duration
		wantErr string
	}{
		{"left out", `{"max_streams": 3}`, [3]caddy.Duration{}, ""},
		{"off", `{"heartbeat": "off", "write_timeout": "off", "drain_window": "off"}`, [3]caddy.Duration{off, off, off}, ""},
		{"negative", `{"heartbeat": -1, "write_timeout": "-1s", "drain_window": -5}`, [3]caddy.Duration{-1, seconds(-1), -5}, ""},
		{"positive", `{"heartbeat": "20s", "write_timeout": 3000000000, "drain_window": "1m"}`,
			[3]caddy.Duration{seconds(20), seconds(3), seconds(60)}, ""},
		{"null", `{"heartbeat": null}`, [3]caddy.Duration{}, ""},
		{"zero heartbeat", `{"heartbeat": 0}`, [3]caddy.Duration{},
			`heartbeat: 0 is ambiguous; write "off" to disable it or a positive duration`},
		{"zero write_timeout", `{"write_timeout": "0s"}`, [3]caddy.Duration{}, `write_timeout: 0 is ambiguous; write "off"`},
		{"zero drain_window", `{"drain_window": "0"}`, [3]caddy.Duration{}, `drain_window: 0 is ambiguous; write "off"`},
		{"bad duration", `{"heartbeat": "soon"}`, [3]caddy.Duration{}, "heartbeat"},
		{"unknown field", `{"hartbeat": "1s"}`, [3]caddy.Duration{}, `unknown field "hartbeat"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// As caddy.Context.LoadModuleByID does.
			var val any = new(Handler)
			err := caddy.StrictUnmarshalJSON([]byte(tc.json), &val)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			h := val.(*Handler)
			if got := [3]caddy.Duration{h.Heartbeat, h.WriteTimeout, h.DrainWindow}; got != tc.want {
				t.Fatalf("heartbeat, write_timeout, drain_window = %v, want %v", got, tc.want)
			}
			if err := h.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
		})
	}

	// The rest of the config is read as before.
	var h Handler
	if err := json.Unmarshal([]byte(`{"max_streams": 3, "retry": "1s", "retry_bounds": ["1s", "1m"]}`), &h); err != nil ||
		h.MaxStreams != 3 || h.Retry != seconds(1) || len(h.RetryBounds) != 2 {
		t.Fatalf("got %+v, %v", h, err)
	}

	// Left out, each gets its default.
	provision(t, &h)
	if h.Heartbeat != caddy.Duration(defaultHeartbeat) || h.WriteTimeout != caddy.Duration(defaultWriteTimeout) ||
		h.DrainWindow != caddy.Duration(defaultDrainWindow) {
		t.Fatalf("defaults: %v %v %v", h.Heartbeat, h.WriteTimeout, h.DrainWindow)
	}
}

// TestCaddyfileOffAdaptsToJSON checks that an adapted Caddyfile says "off"
// where the Caddyfile did, and loads back the same.
func TestCaddyfileOffAdaptsToJSON(t *testing.T) {
	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(
		"sse {\n heartbeat off\n write_timeout off\n drain_window off\n idle_timeout 1m\n}")); err != nil {
		t.Fatal(err)
	}
	out, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"idle_timeout":60000000000,"heartbeat":"off","write_timeout":"off","drain_window":"off"}`; string(out) != want {
		t.Fatalf("adapted to %s, want %s", out, want)
	}
	var back Handler
	if err := json.Unmarshal(out, &back); err != nil || !reflect.DeepEqual(back, h) {
		t.Fatalf("loaded back %+v (%v), want %+v", back, err, h)
	}
	if out, _ := json.Marshal(Handler{Heartbeat: seconds(20)}); string(out) != `{"heartbeat":20000000000}` {
		t.Fatalf("a duration adapted to %s", out)
	}
}

// TestAdaptCaddyfileExample pins the JSON that Caddyfile.example adapts to,
// including the directive's place before reverse_proxy.
func TestAdaptCaddyfileExample(t *testing.T) {
	input, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("testdata/Caddyfile.example.json")
	if err != nil {
		t.Fatal(err)
	}
	caddytest.AssertAdapt(t, string(input), "caddyfile", strings.TrimSpace(string(want)))
}

func TestDirectiveOrderBeforeReverseProxy(t *testing.T) {
	// Written after reverse_proxy, sse must still wrap it.
	caddytest.AssertAdapt(t, `:8080 {
	reverse_proxy 127.0.0.1:9
	sse
}`, "caddyfile", `{
	"apps": {
		"http": {
			"servers": {
				"srv0": {
					"listen": [
						":8080"
					],
					"routes": [
						{
							"handle": [
								{
									"handler": "sse"
								},
								{
									"handler": "reverse_proxy",
									"upstreams": [
										{
											"dial": "127.0.0.1:9"
										}
									]
								}
							]
						}
					]
				}
			}
		}
	}
}`)
}
