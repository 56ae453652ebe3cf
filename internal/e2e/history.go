package e2e

import (
	"fmt"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// History is every kv operation some clients invoked and what each was
// answered, for a linearizability check. It is safe for concurrent use.
//
// A request resent under the same <client>:<seq> (after a lost
// connection or a failover) is one operation: the guest applies a seq
// once and answers a resend from its record, so the operation's call is
// the first send and its return the answer finally read. An operation
// never answered stays pending: the guest may or may not have applied
// it, and porcupine gets an infinite return time for it, so it may take
// effect at any moment after its call, or never.
type History struct {
	mu    sync.Mutex
	start time.Time
	ops   []histOp
}

type histOp struct {
	client   string
	in       KVInput
	call     int64 // ns since start
	ret      int64 // ns since start; math.MaxInt64 while pending
	out      string
	answered bool
}

// NewHistory is an empty history; its clock starts now.
func NewHistory() *History { return &History{start: time.Now()} }

// OpID names one operation of a History.
type OpID int

// Invoke records that client sent cmd ("SET k v", "GET k", "DEL k") at
// time at, and returns the operation's ID for Return. A nil History
// records nothing.
func (h *History) Invoke(client, cmd string, at time.Time) OpID {
	if h == nil {
		return -1
	}
	in := ParseKV(cmd)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ops = append(h.ops, histOp{client: client, in: in, call: at.Sub(h.start).Nanoseconds(), ret: math.MaxInt64})
	return OpID(len(h.ops) - 1)
}

// Return records op's answer (the reply text after "<client>:<seq> ")
// read at time at. An op returned twice keeps its first answer.
func (h *History) Return(op OpID, reply string, at time.Time) {
	if h == nil || op < 0 {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	o := &h.ops[op]
	if o.answered {
		return
	}
	o.ret, o.out, o.answered = max(at.Sub(h.start).Nanoseconds(), o.call), reply, true
}

// Len is the number of operations, answered or pending.
func (h *History) Len() (ops, pending int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, o := range h.ops {
		if !o.answered {
			pending++
		}
	}
	return len(h.ops), pending
}

// Operations is the history as porcupine's operations.
func (h *History) Operations() []porcupine.Operation {
	h.mu.Lock()
	defer h.mu.Unlock()
	clients := map[string]int{}
	out := make([]porcupine.Operation, 0, len(h.ops))
	for _, o := range h.ops {
		id, ok := clients[o.client]
		if !ok {
			id = len(clients)
			clients[o.client] = id
		}
		out = append(out, porcupine.Operation{ClientId: id, Input: o.in, Call: o.call,
			Output: KVOutput{Text: o.out, Unknown: !o.answered}, Return: o.ret})
	}
	return out
}

// Verdict is the answer of a linearizability check.
type Verdict string

// The verdicts. Unknown: the checker ran out of time (the history is
// neither proven linearizable nor shown not to be).
const (
	Linearizable    Verdict = "true"
	NotLinearizable Verdict = "false"
	Unknown         Verdict = "unknown"
)

// CheckResult is a history's verdict with its size.
type CheckResult struct {
	Verdict Verdict
	Ops     int // operations checked
	Pending int // of them never answered
	Took    time.Duration
}

func (r CheckResult) String() string {
	return fmt.Sprintf("linearizable %s (%d operations, %d never answered, checked in %v)", r.Verdict, r.Ops, r.Pending, r.Took.Round(time.Millisecond))
}

// Check runs the history through porcupine against KVModel, for at most
// timeout (0: no bound; callers should give one).
func (h *History) Check(timeout time.Duration) CheckResult {
	ops := h.Operations()
	r := CheckResult{Ops: len(ops)}
	for _, o := range ops {
		if o.Output.(KVOutput).Unknown {
			r.Pending++
		}
	}
	t0 := time.Now()
	res := porcupine.CheckOperationsTimeout(KVModel, ops, timeout)
	r.Took = time.Since(t0)
	switch res {
	case porcupine.Ok:
		r.Verdict = Linearizable
	case porcupine.Illegal:
		r.Verdict = NotLinearizable
	default:
		r.Verdict = Unknown
	}
	return r
}

// ParseKV parses a kv command ("SET k v", "GET k", "DEL k"); anything
// else is an input of Op "?" that the model lets do nothing.
func ParseKV(cmd string) KVInput {
	f := strings.Fields(cmd)
	switch {
	case len(f) == 3 && f[0] == "SET":
		return KVInput{Op: "SET", Key: f[1], Value: f[2]}
	case len(f) == 2 && (f[0] == "GET" || f[0] == "DEL"):
		return KVInput{Op: f[0], Key: f[1]}
	}
	return KVInput{Op: "?", Key: cmd}
}
