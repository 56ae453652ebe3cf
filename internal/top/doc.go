// Package top turns two samples of a node (its status, its metrics and its
// slow list, taken an interval apart) into the text view of `tandem top`:
// role and protection, epochs/s, pause and output-delay percentiles, the
// dirty rate, the phases and handlers with the highest p99 over the
// interval, and the latest slow events.
//
// It owns the arithmetic over histogram deltas and the layout. It must
// never do I/O beyond writing to the io.Writer it is given: fetching the
// samples is the caller's job (api.Client), so the view is tested on
// hand-made samples.
package top
