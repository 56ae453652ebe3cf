// Package progress turns a migration's successive status figures into
// what an operator watches: a percentage that never goes down and an ETA
// that never runs backwards (it counts down, and a worse estimate only
// slows the countdown, never raises it).
//
// It is a pure function of the figures and the times it is given; it
// must never fetch, print or sleep.
package progress
