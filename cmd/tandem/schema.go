package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/tandemvm/tandem/internal/schemacheck"
)

func init() {
	register("schema", "dump this build's stream and device-state schemas, or check two dumps for compatibility", cmdSchema)
}

func cmdSchema(args []string) error {
	if len(args) == 0 {
		return usagef("want 'schema dump' or 'schema check OLD.json NEW.json'")
	}
	switch args[0] {
	case "dump":
		if len(args) != 1 {
			return usagef("schema dump takes no arguments")
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(schemacheck.Current())
	case "check":
		if len(args) != 3 {
			return usagef("want 'schema check OLD.json NEW.json' (dumps of the two builds)")
		}
		old, err := schemacheck.Read(args[1])
		if err != nil {
			return err
		}
		nw, err := schemacheck.Read(args[2])
		if err != nil {
			return err
		}
		problems, notes := schemacheck.Check(old, nw)
		for _, n := range notes {
			fmt.Println("note:", n)
		}
		if len(problems) == 0 {
			fmt.Printf("compatible: streams of %s load in %s, and %s can write them a stream %s reads\n", old.Build, nw.Build, nw.Build, old.Build)
			return nil
		}
		for _, p := range problems {
			fmt.Println("incompatible:", p)
		}
		return fmt.Errorf("%d incompatibilities between %s and %s", len(problems), old.Build, nw.Build)
	}
	return usagef("unknown schema subcommand %q: want dump or check", args[0])
}
