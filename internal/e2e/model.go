package e2e

import (
	"fmt"
	"strings"

	"github.com/anishathalye/porcupine"
)

// KVInput is one kv request as the model sees it.
type KVInput struct {
	Op         string // SET, GET, DEL ("?": unparsed, no effect)
	Key, Value string
}

// KVOutput is its answer: the reply text after "<client>:<seq> " ("OK",
// "OK v", "NOTFOUND", "ERR ..."), or Unknown when none was read.
type KVOutput struct {
	Text    string
	Unknown bool
}

// kvState is one key's value in the model (the history is partitioned by
// key: keys are independent, which keeps the search small).
type kvState struct {
	exists bool
	value  string
}

// KVModel is the guest's kv store as a sequential specification, one key
// per partition, every key absent at the start:
//
//   - SET k v answers OK and k holds v; an ERR answer (a full table) left
//     k as it was.
//   - GET k answers "OK v" when k holds v, NOTFOUND when k is absent.
//   - DEL k answers OK and removes k when it exists, NOTFOUND otherwise.
//   - An operation never answered (Unknown) takes effect when porcupine
//     places it; since it may be placed after every other operation, "it
//     never happened" is covered too.
var KVModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		var keys []string
		for _, o := range history {
			k := o.Input.(KVInput).Key
			if _, ok := byKey[k]; !ok {
				keys = append(keys, k)
			}
			byKey[k] = append(byKey[k], o)
		}
		out := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() interface{} { return kvState{} },
	Step: func(state, input, output interface{}) (bool, interface{}) {
		return kvStep(state.(kvState), input.(KVInput), output.(KVOutput))
	},
	Equal: func(a, b interface{}) bool { return a.(kvState) == b.(kvState) },
	DescribeOperation: func(input, output interface{}) string {
		in, out := input.(KVInput), output.(KVOutput)
		reply := out.Text
		if out.Unknown {
			reply = "(no reply)"
		}
		return strings.TrimSpace(fmt.Sprintf("%s %s %s -> %s", in.Op, in.Key, in.Value, reply))
	},
	DescribeState: func(state interface{}) string {
		s := state.(kvState)
		if !s.exists {
			return "absent"
		}
		return s.value
	},
}

func kvStep(s kvState, in KVInput, out KVOutput) (bool, interface{}) {
	err := strings.HasPrefix(out.Text, "ERR")
	switch in.Op {
	case "SET":
		if out.Unknown || out.Text == "OK" {
			return true, kvState{exists: true, value: in.Value}
		}
		return err, s
	case "GET":
		switch {
		case out.Unknown || err:
			return true, s
		case out.Text == "NOTFOUND":
			return !s.exists, s
		default:
			return s.exists && out.Text == "OK "+s.value, s
		}
	case "DEL":
		switch {
		case out.Unknown:
			return true, kvState{}
		case out.Text == "OK":
			return s.exists, kvState{}
		case out.Text == "NOTFOUND":
			return !s.exists, s
		default:
			return err, s
		}
	}
	return true, s
}
