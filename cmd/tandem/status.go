package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
)

func init() {
	register("status", "show a node's status (--json for machines, --digest for the memory digest)", cmdStatus)
}

func cmdStatus(args []string) error {
	fs := newFlagSet("status")
	api := fs.String("api", "127.0.0.1:7070", "API address of the node")
	asJSON := fs.Bool("json", false, "print one JSON object")
	digest := fs.Bool("digest", false, "add memory_digest, the digest of guest memory now")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	path := "/status"
	if *digest {
		path += "?digest=1"
	}
	// Every field the node sends, as it sends it (not api.Status): a node
	// of a newer build may add some.
	var raw map[string]any
	if err := newAPIClient(*api, id, 0).Get(context.Background(), path, &raw); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(raw)
	}
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := raw[k]
		if m, ok := v.(map[string]any); ok {
			b, _ := json.Marshal(m)
			fmt.Printf("%-24s %s\n", k, b)
			continue
		}
		fmt.Printf("%-24s %v\n", k, v)
	}
	return nil
}
