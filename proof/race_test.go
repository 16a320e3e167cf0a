//go:build race

package proof

// raceEnabled tells the report whether the race detector was on.
const raceEnabled = true
