package tune

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// Action says what apply or revert did with one setting. Values are stable.
type Action string

const (
	ActionChanged     Action = "changed"      // written, and the kernel kept the new value
	ActionWouldChange Action = "would change" // dry run: would have been written
	ActionUnchanged   Action = "unchanged"    // already good (apply) or already the original (revert)
	ActionSkipped     Action = "skipped"      // missing, read-only, info, or changed by someone else since apply
	ActionFailed      Action = "failed"       // the write failed or the kernel did not keep the value
)

// Change is one setting's before and after.
type Change struct {
	Key     string  `json:"key"`
	Scope   string  `json:"scope"`
	Verdict Verdict `json:"verdict,omitempty"` // what check said before (apply only)
	Before  string  `json:"before"`
	After   string  `json:"after"`
	Action  Action  `json:"action"`
	Detail  string  `json:"detail,omitempty"`
}

// Report is what Apply or Revert did.
type Report struct {
	DryRun    bool     `json:"dry_run,omitempty"`
	NetNS     string   `json:"netns,omitempty"` // network namespace per-netns settings were read in
	StatePath string   `json:"state_path,omitempty"`
	Changes   []Change `json:"changes"`
}

// Failed reports whether any change failed.
func (r Report) Failed() bool {
	for _, c := range r.Changes {
		if c.Action == ActionFailed {
			return true
		}
	}
	return false
}

// State is the file apply records the replaced values in.
type State struct {
	Version int `json:"version"`
	// Root is the sysctl root the values were written under.
	Root string `json:"root"`
	// NetNS is the network namespace the per-netns values were written in;
	// revert refuses to restore them into another one.
	NetNS   string       `json:"netns,omitempty"`
	Entries []StateEntry `json:"settings"`
}

// StateEntry is one replaced value.
type StateEntry struct {
	Key      string    `json:"key"`
	PerNetNS bool      `json:"per_netns"`
	Original string    `json:"original"`
	Applied  string    `json:"applied"`
	Time     time.Time `json:"time"`
}

const stateVersion = 1

// ReadState reads a state file written by Apply. A file that does not
// exist gives an error wrapping fs.ErrNotExist.
func ReadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("reading tune state %s: %w", path, err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("reading tune state %s: version %d, this wsplice reads %d", path, st.Version, stateVersion)
	}
	return &st, nil
}

func writeState(path string, st *State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("recording originals: %w (choose another file with --state)", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("recording originals: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("recording originals: %w", err)
	}
	return nil
}

// Apply writes every setting whose verdict is low, recording the value it
// replaces in the state file first (merged with what an earlier apply
// recorded, whose originals are kept). Settings that are ok, missing,
// read-only or info are left alone. With dryRun nothing is written, the
// state file included.
//
// Apply returns an error only when it cannot record the originals, and then
// it has written nothing; a setting that fails to write is a Change with
// ActionFailed.
func (c *Checker) Apply(dryRun bool) (Report, error) {
	rep := Report{DryRun: dryRun, NetNS: c.nsID(), StatePath: c.statePath()}
	results := c.Check()
	byKey := map[string]Setting{}
	for _, s := range c.settings() {
		byKey[s.Key] = s
	}

	var todo []Result
	for _, r := range results {
		if r.Verdict == VerdictLow {
			todo = append(todo, r)
		}
	}
	if len(todo) > 0 && !dryRun {
		if err := c.record(todo, byKey, rep.NetNS); err != nil {
			return rep, err
		}
	}
	for _, r := range results {
		ch := Change{Key: r.Key, Scope: r.Scope, Verdict: r.Verdict, Before: r.Current, After: r.Current, Detail: r.Detail}
		switch r.Verdict {
		case VerdictOK:
			ch.Action = ActionUnchanged
		case VerdictLow:
			if dryRun {
				ch.Action, ch.After = ActionWouldChange, r.Target
				break
			}
			ch.Action, ch.After, ch.Detail = c.set(byKey[r.Key], r.Target)
		case VerdictInfo:
			ch.Action, ch.Detail = ActionSkipped, "information only: never applied"
		default:
			ch.Action = ActionSkipped
		}
		rep.Changes = append(rep.Changes, ch)
	}
	return rep, nil
}

// set writes target and reads it back.
func (c *Checker) set(s Setting, target string) (Action, string, string) {
	p := s.path(c.root())
	if err := c.write(p, target); err != nil {
		after, _ := c.read(s)
		if isReadOnlyErr(err) {
			return ActionFailed, after, readOnlyDetail(s, err)
		}
		return ActionFailed, after, fmt.Sprintf("writing %s: %v", target, err)
	}
	after, err := c.read(s)
	if err != nil {
		return ActionFailed, after, fmt.Sprintf("reading back: %v", err)
	}
	if normalize(after) != normalize(target) {
		return ActionFailed, after, fmt.Sprintf("wrote %s but the kernel kept %s", target, after)
	}
	return ActionChanged, after, ""
}

// record merges the current values of todo into the state file. A key
// already recorded keeps its original: the first apply saw the operator's
// value, later ones see wsplice's.
func (c *Checker) record(todo []Result, byKey map[string]Setting, netns string) error {
	path := c.statePath()
	st, err := ReadState(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		st = &State{Version: stateVersion, Root: c.root(), NetNS: netns}
	case err != nil:
		return fmt.Errorf("recording originals: %w", err)
	case st.Root != c.root():
		return fmt.Errorf("tune state %s was recorded for %s, not %s: use another --state file", path, st.Root, c.root())
	case st.NetNS != "" && netns != "" && st.NetNS != netns && hasPerNetNS(st):
		return fmt.Errorf("tune state %s holds originals from network namespace %s, this is %s: revert there first or use another --state file", path, st.NetNS, netns)
	}
	if st.NetNS == "" {
		st.NetNS = netns
	}
	now := time.Now().UTC().Truncate(time.Second)
	for _, r := range todo {
		found := false
		for i := range st.Entries {
			if st.Entries[i].Key == r.Key {
				st.Entries[i].Applied, found = r.Target, true
			}
		}
		if !found {
			st.Entries = append(st.Entries, StateEntry{Key: r.Key, PerNetNS: byKey[r.Key].PerNetNS, Original: r.Current, Applied: r.Target, Time: now})
		}
	}
	return writeState(path, st)
}

func hasPerNetNS(st *State) bool {
	for _, e := range st.Entries {
		if e.PerNetNS {
			return true
		}
	}
	return false
}

// Revert restores the originals recorded by Apply. A setting is restored
// only if it still holds the value apply wrote: one changed since by
// someone else is left alone and reported. Per-netns settings are restored
// only in the network namespace they were applied in. Entries that are
// restored (or already hold their original) leave the state file; the file
// is removed when none remain.
//
// Revert returns an error when the state file cannot be read (wrapping
// fs.ErrNotExist when there is none) or rewritten.
func (c *Checker) Revert(dryRun bool) (Report, error) {
	path := c.statePath()
	rep := Report{DryRun: dryRun, NetNS: c.nsID(), StatePath: path}
	st, err := ReadState(path)
	if err != nil {
		return rep, err
	}
	if st.Root != c.root() {
		return rep, fmt.Errorf("tune state %s was recorded for %s, not %s", path, st.Root, c.root())
	}
	var keep []StateEntry
	for _, e := range st.Entries {
		s, ok := c.settingFor(e)
		ch := Change{Key: e.Key, Scope: scope(s)}
		cur, rerr := c.read(s)
		ch.Before, ch.After = cur, cur
		switch {
		case !ok:
			ch.Action, ch.Detail = ActionSkipped, "not a setting wsplice knows"
		case e.PerNetNS && st.NetNS != "" && rep.NetNS != "" && st.NetNS != rep.NetNS:
			ch.Action = ActionSkipped
			ch.Detail = fmt.Sprintf("applied in network namespace %s, this is %s", st.NetNS, rep.NetNS)
		case errors.Is(rerr, fs.ErrNotExist):
			ch.Action, ch.Detail = ActionSkipped, missingDetail(s)
		case rerr != nil:
			ch.Action, ch.Detail = ActionFailed, rerr.Error()
		case cur == normalize(e.Original):
			ch.Action = ActionUnchanged
		case cur != normalize(e.Applied):
			ch.Action = ActionSkipped
			ch.Detail = fmt.Sprintf("changed since apply (apply wrote %s, now %s): left alone", e.Applied, cur)
		case dryRun:
			ch.Action, ch.After = ActionWouldChange, normalize(e.Original)
		default:
			ch.Action, ch.After, ch.Detail = c.set(s, normalize(e.Original))
		}
		if ch.Action != ActionChanged && ch.Action != ActionUnchanged {
			keep = append(keep, e)
		}
		rep.Changes = append(rep.Changes, ch)
	}
	if dryRun {
		return rep, nil
	}
	if len(keep) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return rep, fmt.Errorf("removing tune state: %w", err)
		}
		return rep, nil
	}
	st.Entries = keep
	return rep, writeState(path, st)
}

// settingFor finds the setting of a state entry: in the checker's table,
// else in Settings, else a bare setting built from the entry so its file
// can still be named.
func (c *Checker) settingFor(e StateEntry) (Setting, bool) {
	for _, s := range c.settings() {
		if s.Key == e.Key {
			return s, true
		}
	}
	if s, ok := Lookup(e.Key); ok {
		return s, true
	}
	return Setting{Key: e.Key, PerNetNS: e.PerNetNS}, false
}
