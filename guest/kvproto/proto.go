package kvproto

import (
	"bytes"
	"fmt"
	"strconv"
)

// Limits of the protocol.
const (
	MaxClient = 32  // bytes of a client name
	MaxKey    = 64  // bytes of a key
	MaxValue  = 256 // bytes of a value
	// MaxLine bounds a request line without its newline; longer lines are
	// malformed. The longest valid request is a SET with every field at its
	// maximum.
	MaxLine = MaxClient + 1 + 20 + len(" SET ") + MaxKey + 1 + MaxValue
	// MaxReply bounds a reply line without its newline.
	MaxReply = MaxClient + 1 + 20 + len(" OK ") + MaxValue
)

// Op is a request's command.
type Op uint8

// Commands.
const (
	OpSet Op = iota + 1
	OpGet
	OpDel
)

func (o Op) String() string {
	switch o {
	case OpSet:
		return "SET"
	case OpGet:
		return "GET"
	case OpDel:
		return "DEL"
	}
	return "?"
}

// Request is one parsed request line.
type Request struct {
	Client string
	Seq    uint64
	Op     Op
	Key    string
	Value  string // SET only
}

// ParseError is a malformed request. HasID says whether the line's
// "<client>:<seq>" parsed, in which case the ERR reply carries it.
type ParseError struct {
	HasID  bool
	Client string
	Seq    uint64
	Reason string
}

func (e *ParseError) Error() string { return "kvproto: " + e.Reason }

// Reply returns the ERR reply line for e, without newline.
func (e *ParseError) Reply() []byte {
	if e.HasID {
		return ErrReply(e.Client, e.Seq, e.Reason)
	}
	return []byte("ERR " + e.Reason)
}

// Parse parses one request line (without its newline; a trailing '\r' is
// ignored). Fields are separated by single spaces. On a malformed line it
// returns a *ParseError.
func Parse(line []byte) (Request, error) {
	line = bytes.TrimSuffix(line, []byte{'\r'})
	if len(line) == 0 {
		return Request{}, &ParseError{Reason: "empty request"}
	}
	if len(line) > MaxLine {
		return Request{}, &ParseError{Reason: "line too long"}
	}
	fields := bytes.Split(line, []byte{' '})
	id := fields[0]
	colon := bytes.IndexByte(id, ':')
	if colon < 0 {
		return Request{}, &ParseError{Reason: "missing <client>:<seq>"}
	}
	client, seqText := id[:colon], id[colon+1:]
	if !ValidClient(client) {
		return Request{}, &ParseError{Reason: "bad client: want [A-Za-z0-9_-]{1,32}"}
	}
	seq, err := strconv.ParseUint(string(seqText), 10, 64)
	if err != nil || len(seqText) == 0 || seqText[0] == '+' {
		return Request{}, &ParseError{Reason: "bad seq: want a decimal uint64"}
	}
	req := Request{Client: string(client), Seq: seq}
	fail := func(reason string) (Request, error) {
		return Request{}, &ParseError{HasID: true, Client: req.Client, Seq: seq, Reason: reason}
	}
	if len(fields) < 2 {
		return fail("missing command: want SET, GET or DEL")
	}
	want := 0
	switch string(fields[1]) {
	case "SET":
		req.Op, want = OpSet, 4
	case "GET":
		req.Op, want = OpGet, 3
	case "DEL":
		req.Op, want = OpDel, 3
	default:
		return fail("unknown command: want SET, GET or DEL")
	}
	if len(fields) != want {
		return fail(fmt.Sprintf("%s takes %d argument(s) separated by single spaces", req.Op, want-2))
	}
	if !ValidKey(fields[2]) {
		return fail("bad key: want [A-Za-z0-9_.-]{1,64}")
	}
	req.Key = string(fields[2])
	if req.Op == OpSet {
		if !ValidValue(fields[3]) {
			return fail("bad value: want 1 to 256 printable ASCII bytes without spaces")
		}
		req.Value = string(fields[3])
	}
	return req, nil
}

// ValidClient reports whether c matches [A-Za-z0-9_-]{1,32}.
func ValidClient(c []byte) bool {
	if len(c) < 1 || len(c) > MaxClient {
		return false
	}
	for _, b := range c {
		if !alnum(b) && b != '_' && b != '-' {
			return false
		}
	}
	return true
}

// ValidKey reports whether k matches [A-Za-z0-9_.-]{1,64}.
func ValidKey(k []byte) bool {
	if len(k) < 1 || len(k) > MaxKey {
		return false
	}
	for _, b := range k {
		if !alnum(b) && b != '_' && b != '-' && b != '.' {
			return false
		}
	}
	return true
}

// ValidValue reports whether v is 1 to 256 printable ASCII bytes without
// spaces.
func ValidValue(v []byte) bool {
	if len(v) < 1 || len(v) > MaxValue {
		return false
	}
	for _, b := range v {
		if b <= ' ' || b > '~' {
			return false
		}
	}
	return true
}

func alnum(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9'
}

// Format returns the request line for r, without newline.
func Format(r Request) []byte {
	b := appendID(nil, r.Client, r.Seq)
	b = append(b, ' ')
	b = append(b, r.Op.String()...)
	b = append(b, ' ')
	b = append(b, r.Key...)
	if r.Op == OpSet {
		b = append(b, ' ')
		b = append(b, r.Value...)
	}
	return b
}

// OKReply is "<client>:<seq> OK", or "<client>:<seq> OK <value>" when value
// is not empty.
func OKReply(client string, seq uint64, value []byte) []byte {
	b := appendID(make([]byte, 0, 64+len(value)), client, seq)
	b = append(b, " OK"...)
	if len(value) > 0 {
		b = append(b, ' ')
		b = append(b, value...)
	}
	return b
}

// NotFoundReply is "<client>:<seq> NOTFOUND".
func NotFoundReply(client string, seq uint64) []byte {
	return append(appendID(nil, client, seq), " NOTFOUND"...)
}

// ErrReply is "<client>:<seq> ERR <reason>".
func ErrReply(client string, seq uint64, reason string) []byte {
	b := appendID(nil, client, seq)
	b = append(b, " ERR "...)
	return append(b, reason...)
}

func appendID(b []byte, client string, seq uint64) []byte {
	b = append(b, client...)
	b = append(b, ':')
	return strconv.AppendUint(b, seq, 10)
}

// Reply is a parsed reply line.
type Reply struct {
	HasID  bool
	Client string
	Seq    uint64
	Status string // "OK", "NOTFOUND" or "ERR"
	Rest   string // the value after OK, or the reason after ERR
}

// ParseReply parses one reply line (without newline).
func ParseReply(line []byte) (Reply, error) {
	line = bytes.TrimSuffix(line, []byte{'\r'})
	var r Reply
	rest := line
	if !bytes.HasPrefix(line, []byte("ERR ")) {
		sp := bytes.IndexByte(line, ' ')
		if sp < 0 {
			return Reply{}, fmt.Errorf("kvproto: reply %q: want <client>:<seq> STATUS", truncate(line))
		}
		id := line[:sp]
		colon := bytes.IndexByte(id, ':')
		if colon < 0 || !ValidClient(id[:colon]) {
			return Reply{}, fmt.Errorf("kvproto: reply %q: bad id", truncate(line))
		}
		seq, err := strconv.ParseUint(string(id[colon+1:]), 10, 64)
		if err != nil {
			return Reply{}, fmt.Errorf("kvproto: reply %q: bad seq", truncate(line))
		}
		r.HasID, r.Client, r.Seq = true, string(id[:colon]), seq
		rest = line[sp+1:]
	}
	status, tail, _ := bytes.Cut(rest, []byte{' '})
	switch string(status) {
	case "OK", "NOTFOUND", "ERR":
	default:
		return Reply{}, fmt.Errorf("kvproto: reply %q: unknown status", truncate(line))
	}
	r.Status, r.Rest = string(status), string(tail)
	return r, nil
}

func truncate(b []byte) []byte {
	if len(b) > 80 {
		return b[:80]
	}
	return b
}
