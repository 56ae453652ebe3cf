// Package progress shows a migration to an operator. Tracker turns its
// successive status figures into a percentage that never goes down and an
// ETA that never runs backwards (it counts down, and a worse estimate
// only slows the countdown, never raises it); Line, Bar and WriteSummary
// format them; Follow polls a node's API and writes them until the
// migration ends (what `tandem migrate` prints).
//
// Tracker and the formatters are pure functions of the figures and the
// times they are given; only Follow fetches and sleeps.
package progress
