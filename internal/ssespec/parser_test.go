package ssespec

import (
	"reflect"
	"testing"
)

// msg builds a "message" event, the common case in the table below.
func msg(data, lastEventID string) Event {
	return Event{Type: "message", Data: data, LastEventID: lastEventID}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		body string
		want Result
	}{
		// The examples given in the specification itself.
		{
			name: "spec: multi-line data",
			body: "data: YHOO\ndata: +2\ndata: 10\n\n",
			want: Result{Events: []Event{msg("YHOO\n+2\n10", "")}},
		},
		{
			name: "spec: four blocks with comment and id reset",
			body: ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
			want: Result{Events: []Event{
				msg("first event", "1"),
				msg("second event", ""),
				msg(" third event", ""),
			}},
		},
		{
			name: "spec: data without colon and a final block lacking its blank line",
			body: "data\n\ndata\ndata\n\ndata:",
			want: Result{Events: []Event{msg("", ""), msg("\n", "")}},
		},
		{
			name: "spec: the space after the colon is optional",
			body: "data:test\n\ndata: test\n\n",
			want: Result{Events: []Event{msg("test", ""), msg("test", "")}},
		},
		{
			name: "spec: event types",
			body: "event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
			want: Result{Events: []Event{
				{Type: "add", Data: "73857293"},
				{Type: "remove", Data: "2153"},
				{Type: "add", Data: "113411"},
			}},
		},

		// Line terminators.
		{
			name: "CRLF",
			body: "data: a\r\ndata: b\r\n\r\n",
			want: Result{Events: []Event{msg("a\nb", "")}},
		},
		{
			name: "lone CR",
			body: "data: a\rdata: b\r\r",
			want: Result{Events: []Event{msg("a\nb", "")}},
		},
		{
			name: "CRLF, CR and LF mixed",
			body: "data: a\r\n\rdata: b\n\r\ndata: c\rdata: d\n\n",
			want: Result{Events: []Event{msg("a", ""), msg("b", ""), msg("c\nd", "")}},
		},
		{
			name: "LF then CR is two terminators",
			body: "data: a\n\r",
			want: Result{Events: []Event{msg("a", "")}},
		},
		{
			name: "CR as the very last byte ends a line",
			body: "data: a\r\n\r",
			want: Result{Events: []Event{msg("a", "")}},
		},

		// Byte order marks and decoding.
		{
			name: "BOM at the start is dropped",
			body: "\xEF\xBB\xBFdata: a\n\n",
			want: Result{Events: []Event{msg("a", "")}},
		},
		{
			name: "second BOM joins the first field name and kills it",
			body: "\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\ndata: b\n\n",
			want: Result{Events: []Event{msg("b", "")}},
		},
		{
			name: "BOM after the start is an ordinary character",
			body: "data: a\n\n\xEF\xBB\xBFdata: b\n\ndata: \xEF\xBB\xBFc\n\n",
			want: Result{Events: []Event{msg("a", ""), msg("\uFEFFc", "")}},
		},
		{
			name: "invalid UTF-8: one U+FFFD per maximal invalid subpart",
			// E2 82 is a cut-off sequence (one error); C0 and AF are each an
			// error; ED A0 80 is a surrogate (three errors); F0 9F 98 80 is valid.
			body: "data: a\xE2\x82b\xC0\xAFc\xED\xA0\x80d\xF0\x9F\x98\x80\n\n",
			want: Result{Events: []Event{msg("a\uFFFDb\uFFFD\uFFFDc\uFFFD\uFFFD\uFFFDd\U0001F600", "")}},
		},
		{
			name: "invalid UTF-8 right before a line terminator",
			body: "data: \xF0\x9F\n\n",
			want: Result{Events: []Event{msg("\uFFFD", "")}},
		},

		// Comments and field syntax.
		{
			name: "comments between lines of one event",
			body: "data: a\n: note\ndata: b\n:\n\n",
			want: Result{Events: []Event{msg("a\nb", "")}},
		},
		{
			name: "stream of comments only",
			body: ": hello\n:\n\n: again\n\n",
			want: Result{},
		},
		{
			name: "empty body",
			body: "",
			want: Result{},
		},
		{
			name: "empty data lines",
			body: "data:\n\ndata:\ndata:\n\ndata: a\ndata:\n\n",
			want: Result{Events: []Event{msg("", ""), msg("\n", ""), msg("a\n", "")}},
		},
		{
			name: "only one space is stripped, tabs are kept, later colons are data",
			body: "data:  two\n\ndata:\tx\n\ndata: a:b\n\n",
			want: Result{Events: []Event{msg(" two", ""), msg("\tx", ""), msg("a:b", "")}},
		},
		{
			name: "unknown, miscased and space-prefixed field names are ignored",
			body: "foo: bar\nData: x\n data: y\ndata: z\n\n",
			want: Result{Events: []Event{msg("z", "")}},
		},

		// The event field.
		{
			name: "event type is reset after each dispatch",
			body: "event: add\ndata: 1\n\ndata: 2\n\n",
			want: Result{Events: []Event{{Type: "add", Data: "1"}, msg("2", "")}},
		},
		{
			name: "empty event type means message, the last event field wins",
			body: "event:\ndata: 1\n\nevent: a\nevent: b\ndata: 2\n\n",
			want: Result{Events: []Event{msg("1", ""), {Type: "b", Data: "2"}}},
		},
		{
			name: "a blank line without data resets the event type",
			body: "event: add\n\ndata: x\n\n",
			want: Result{Events: []Event{msg("x", "")}},
		},

		// The id field.
		{
			name: "id persists across events",
			body: "id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n",
			want: Result{Events: []Event{msg("a", "1"), msg("b", "1"), msg("c", "2")}, LastEventID: "2"},
		},
		{
			name: "id after data in the same event applies to it",
			body: "data: x\nid: 5\n\n",
			want: Result{Events: []Event{msg("x", "5")}, LastEventID: "5"},
		},
		{
			name: "id without data still sets the last event ID at the blank line",
			body: "id: 7\n\n",
			want: Result{LastEventID: "7"},
		},
		{
			name: "id containing NUL is ignored",
			body: "id: 1\n\nid: a\x00b\ndata: x\n\n",
			want: Result{Events: []Event{msg("x", "1")}, LastEventID: "1"},
		},
		{
			name: "id keeps trailing spaces and may be emptied",
			body: "id: 1 \ndata: a\n\nid:\ndata: b\n\n",
			want: Result{Events: []Event{msg("a", "1 "), msg("b", "")}},
		},

		// The retry field.
		{
			name: "retry values made of digits count, in order",
			body: "retry: 1000\nretry:007\ndata: x\n\nretry: 0\n\n",
			want: Result{Events: []Event{msg("x", "")}, Retries: []int64{1000, 7, 0}},
		},
		{
			name: "retry values with anything but digits are ignored",
			body: "retry: 10x\nretry: -1\nretry:  5\nretry: 1.5\nretry: 5 \nretry:\nretry\nretry: 99999999999999999999\n\n",
			want: Result{},
		},

		// End of the body.
		{
			name: "unterminated final event is discarded",
			body: "data: a\n\ndata: b\n",
			want: Result{Events: []Event{msg("a", "")}},
		},
		{
			name: "unterminated final line is discarded",
			body: "data: a\n\ndata: b",
			want: Result{Events: []Event{msg("a", "")}},
		},
		{
			name: "fields of an unfinished event reach the buffers but not the last event ID string",
			body: "id: 1\ndata: a\n\nid: 9\nretry: 3000\ndata: b\n",
			want: Result{Events: []Event{msg("a", "1")}, Retries: []int64{3000}, LastEventID: "1"},
		},
		{
			name: "an unterminated retry line is not processed",
			body: "retry: 3000",
			want: Result{},
		},
		{
			name: "a comment and blank line appended to an unfinished event dispatch it",
			body: "data: a\n:\n\n",
			want: Result{Events: []Event{msg("a", "")}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Parse([]byte(tt.body))
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Parse(%q)\n got: %#v\nwant: %#v", tt.body, got, tt.want)
			}
		})
	}
}

// TestParsePrefixes checks bodies cut short, as when a stream ends early: a
// CR as the last byte ends its line even when the full stream had an LF next,
// and nothing after the last blank line is dispatched.
func TestParsePrefixes(t *testing.T) {
	body := "id: 1\r\ndata: a\r\n\r\nevent: e\rdata: b\r\r"
	cases := map[int]Result{
		len("id: 1\r\ndata: a\r\n\r"):   {Events: []Event{msg("a", "1")}, LastEventID: "1"},
		len("id: 1\r\ndata: a\r\n\r\n"): {Events: []Event{msg("a", "1")}, LastEventID: "1"},
		len(body) - 1:                   {Events: []Event{msg("a", "1")}, LastEventID: "1"},
		len(body):                       {Events: []Event{msg("a", "1"), {Type: "e", Data: "b", LastEventID: "1"}}, LastEventID: "1"},
	}
	for n, want := range cases {
		if got := Parse([]byte(body[:n])); !reflect.DeepEqual(got, want) {
			t.Errorf("Parse(%q)\n got: %#v\nwant: %#v", body[:n], got, want)
		}
	}
}
