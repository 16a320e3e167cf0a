package caddysse

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("sse", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("sse", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	sse [<matcher>] {
//	    heartbeat       <duration>|off
//	    heartbeat_text  <text>
//	    idle_timeout    <duration>
//	    max_lifetime    <duration>
//	    lifetime_jitter <fraction 0..1>
//	    retry           <duration>
//	    close_event     <event type>
//	    close_grace     <duration>
//	    write_timeout   <duration>|off
//	    drain_window    <duration>|off
//	    max_streams            <n>
//	    max_streams_per_client <n>
//	    last_event_id_query    <param>
//	    refuse_with            stream|status
//	    retry_statuses         <code|4xx|5xx>...|off
//	    max_stream_rate        <n per second>
//	    retry_bounds           <min> <max>
//	    share [<key>] {
//	        replay      <events>
//	        linger      <duration>|off
//	        assign_ids
//	        max_backlog <size>
//	        store       <name> [{ <store options> }]
//	    }
//	}
//
// Every option may appear once. Without a block, all defaults apply.
// heartbeat, write_timeout and drain_window refuse 0, which could mean
// "off" or "the default": write off, or a positive duration.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.Errf("sse: want sse [<matcher>] [{ <options> }], got the argument %q", d.Val())
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] {
			return d.Errf("%s: option given more than once", option)
		}
		seen[option] = true
		if _, known := optionSyntax[option]; !known && option != "share" {
			return d.Errf("unrecognized sse option %q", option)
		}
		if option == "retry_statuses" {
			h.RetryStatuses = d.RemainingArgs()
			if len(h.RetryStatuses) == 0 {
				return wantErr(d, option)
			}
			if _, err := parseRetryStatuses(h.RetryStatuses); err != nil {
				return d.Err(err.Error())
			}
			continue
		}
		if option == "share" {
			if err := h.unmarshalShare(d); err != nil {
				return err
			}
			continue
		}
		if option == "retry_bounds" {
			args := d.RemainingArgs()
			if len(args) != 2 {
				return wantErr(d, option)
			}
			for _, a := range args {
				dur, err := parseDuration(d, option, a)
				if err != nil {
					return err
				}
				h.RetryBounds = append(h.RetryBounds, dur)
			}
			if h.RetryBounds[0] > h.RetryBounds[1] {
				return d.Errf("%s: the minimum %s is above the maximum %s", option, args[0], args[1])
			}
			continue
		}
		if !d.NextArg() {
			return wantErr(d, option)
		}
		value := d.Val()
		if d.NextArg() {
			return wantErr(d, option)
		}
		var err error
		switch option {
		case "heartbeat":
			h.Heartbeat, err = parseOffDuration(d, option, value)
		case "heartbeat_text":
			h.HeartbeatText, err = parseLineText(d, option, value)
		case "idle_timeout":
			h.IdleTimeout, err = parseDuration(d, option, value)
		case "max_lifetime":
			h.MaxLifetime, err = parseDuration(d, option, value)
		case "lifetime_jitter":
			j, perr := strconv.ParseFloat(value, 64)
			if perr != nil || !(j >= 0 && j <= 1) {
				return d.Errf("%s: want a number between 0 and 1, got %q", option, value)
			}
			h.LifetimeJitter = &j
		case "retry":
			h.Retry, err = parseDuration(d, option, value)
		case "close_event":
			h.CloseEvent, err = parseLineText(d, option, value)
		case "close_grace":
			h.CloseGrace, err = parseDuration(d, option, value)
		case "write_timeout":
			h.WriteTimeout, err = parseOffDuration(d, option, value)
		case "drain_window":
			h.DrainWindow, err = parseOffDuration(d, option, value)
		case "max_streams":
			h.MaxStreams, err = parseCount(d, option, value)
		case "max_streams_per_client":
			h.MaxStreamsPerClient, err = parseCount(d, option, value)
		case "max_stream_rate":
			h.MaxStreamRate, err = parseCount(d, option, strings.TrimSuffix(value, "/s"))
		case "last_event_id_query":
			h.LastEventIDQuery = value
		case "refuse_with":
			if value != refuseWithStream && value != refuseWithStatus {
				return d.Errf("%s: want %s or %s, got %q", option, refuseWithStream, refuseWithStatus, value)
			}
			h.RefuseWith = value
		default:
			return d.Errf("unrecognized sse option %q", option)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// optionSyntax is what each option takes (share has its own parser), for
// the errors that say so.
var optionSyntax = map[string]string{
	"heartbeat":              "<duration>|off",
	"heartbeat_text":         "<text>",
	"idle_timeout":           "<duration>",
	"max_lifetime":           "<duration>",
	"lifetime_jitter":        "<fraction 0..1>",
	"retry":                  "<duration>",
	"close_event":            "<event type>",
	"close_grace":            "<duration>",
	"write_timeout":          "<duration>|off",
	"drain_window":           "<duration>|off",
	"max_streams":            "<n>",
	"max_streams_per_client": "<n>",
	"last_event_id_query":    "<param>",
	"refuse_with":            "stream|status",
	"retry_statuses":         "<code|4xx|5xx>...|off",
	"max_stream_rate":        "<n per second>",
	"retry_bounds":           "<min> <max>",
}

// wantErr is the error for an option given the wrong number of
// arguments: it says what the option takes, at the option's line.
func wantErr(d *caddyfile.Dispenser, option string) error {
	return d.Errf("%s: want %s %s", option, option, optionSyntax[option])
}

// parseDuration parses a non-negative duration option.
func parseDuration(d *caddyfile.Dispenser, option, value string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(value)
	if err != nil {
		return 0, d.Errf("%s: invalid duration %q", option, value)
	}
	if dur < 0 {
		return 0, d.Errf("%s: must not be negative, got %s", option, value)
	}
	return caddy.Duration(dur), nil
}

// parseOffDuration parses an option that takes a positive duration or
// off; 0 is ambiguous, as in JSON (see Handler.UnmarshalJSON).
func parseOffDuration(d *caddyfile.Dispenser, option, value string) (caddy.Duration, error) {
	if value == "off" {
		return durationOff, nil
	}
	dur, err := parseDuration(d, option, value)
	if err == nil && dur == 0 {
		err = d.Errf(zeroIsAmbiguous, option)
	}
	return dur, err
}

// parseCount parses a positive whole number.
func parseCount(d *caddyfile.Dispenser, option, value string) (int, error) {
	n, err := strconv.Atoi(value)
	if err != nil || n < 1 {
		return 0, d.Errf("%s: want a whole number of at least 1, got %q", option, value)
	}
	return n, nil
}

// parseLineText checks that a text option fits in one event-stream line.
func parseLineText(d *caddyfile.Dispenser, option, value string) (string, error) {
	if strings.ContainsAny(value, "\r\n") {
		return "", d.Errf("%s: must not contain CR or LF", option)
	}
	return value, nil
}

// unmarshalShare reads `share [<key>] { ... }`.
func (h *Handler) unmarshalShare(d *caddyfile.Dispenser) error {
	c := new(ShareConfig)
	if d.NextArg() {
		c.Key = d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] {
			return d.Errf("share: %s: option given more than once", option)
		}
		seen[option] = true
		if option == "store" {
			if !d.NextArg() {
				return d.ArgErr()
			}
			name := d.Val()
			unm, err := caddyfile.UnmarshalModule(d, "http.handlers.sse.stores."+name)
			if err != nil {
				return err
			}
			c.StoreRaw = caddyconfig.JSONModuleObject(unm, "backend", name, nil)
			continue
		}
		if option == "assign_ids" {
			if d.NextArg() {
				return d.ArgErr()
			}
			c.AssignIDs = true
			continue
		}
		if !d.NextArg() {
			return d.ArgErr()
		}
		value := d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
		switch option {
		case "replay":
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 {
				return d.Errf("share: replay: want a whole number of events, 0 or more, got %q", value)
			}
			c.Replay = &n
		case "linger":
			if value == "off" {
				c.Linger = -1
				break
			}
			dur, err := parseDuration(d, "share: linger", value)
			if err != nil {
				return err
			}
			if dur == 0 {
				return d.Errf("share: linger: 0 is ambiguous; write off to release the upstream at once, or a positive duration")
			}
			c.Linger = dur
		case "max_backlog":
			n, err := parseSize(value)
			if err != nil || n < 1 {
				return d.Errf("share: max_backlog: want a size such as 512KiB or 1MiB, got %q", value)
			}
			c.MaxBacklog = n
		default:
			return d.Errf("unrecognized share option %q", option)
		}
	}
	h.Share = c
	return nil
}

// parseSize parses a byte size: a whole number with an optional unit, B,
// KB, KiB, MB, MiB, GB or GiB.
func parseSize(s string) (int64, error) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, err
	}
	units := map[string]int64{"": 1, "b": 1, "kb": 1000, "kib": 1 << 10, "mb": 1000 * 1000,
		"mib": 1 << 20, "gb": 1000 * 1000 * 1000, "gib": 1 << 30}
	unit, ok := units[strings.ToLower(strings.TrimSpace(s[i:]))]
	if !ok || n > (1<<62)/unit {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return n * unit, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
