//go:build race

package handshake

// raceEnabled: the race detector changes allocation counts.
const raceEnabled = true
