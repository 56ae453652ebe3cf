package e2e

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// VerifyRun reads back every key lg's clients wrote or read, through c (a
// client id of its own, whose operations join lg.History), checks lg
// against what it reads (CheckState), then deletes them all so
// the next run, which writes the same key names, starts from an empty
// table. Each batch of 64 requests must be answered within batchLimit.
func VerifyRun(ctx context.Context, c *KVClient, lg *RunLog, batchLimit time.Duration) (lost, divergent int, detail []string, err error) {
	c.History = lg.History
	lg.Mu.Lock()
	keys := make([]string, 0, len(lg.Sets))
	for k := range lg.Sets {
		keys = append(keys, k)
	}
	for _, g := range lg.Gets {
		keys = append(keys, g.Key)
	}
	lg.Mu.Unlock()
	slices.Sort(keys)
	keys = slices.Compact(keys)
	final := map[string]string{}
	for batch := range slices.Chunk(keys, 64) {
		cmds := make([]string, len(batch))
		for i, k := range batch {
			cmds[i] = "GET " + k
		}
		reps, err := c.DoBatch(ctx, cmds, time.Now().Add(batchLimit))
		if err != nil {
			return 0, 0, nil, err
		}
		for i, k := range batch {
			final[k] = reps[i].Text
		}
	}
	lg.Mu.Lock()
	lost, divergent, detail = CheckState(lg.Sets, lg.Gets, final)
	lg.Mu.Unlock()
	dels := make([]string, len(keys))
	for i, k := range keys {
		dels[i] = "DEL " + k
	}
	for batch := range slices.Chunk(dels, 64) {
		if _, err := c.DoBatch(ctx, batch, time.Now().Add(batchLimit)); err != nil {
			return lost, divergent, detail, fmt.Errorf("delete the run's keys: %w", err)
		}
	}
	return lost, divergent, detail, nil
}
