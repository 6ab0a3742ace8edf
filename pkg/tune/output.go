package tune

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// WriteResults writes check's results as a table for people: setting,
// scope, current, recommended, verdict, why (the why last, being long).
// netns, when set, names the network namespace per-netns settings were read in.
func WriteResults(w io.Writer, rs []Result, netns string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SETTING\tSCOPE\tCURRENT\tRECOMMENDED\tVERDICT\tWHY")
	for _, r := range rs {
		rec := r.Recommended
		switch {
		case r.Compare == Info:
			rec = "(kernel's)"
		case r.Compare == AtLeast:
			rec = "≥ " + rec
		case r.Compare == AtMost:
			rec = "≤ " + rec
		case r.Compare == Range:
			rec = "⊇ " + rec
		}
		verdict := string(r.Verdict)
		if r.Verdict == VerdictLow && r.Target != "" {
			verdict += " → " + r.Target
		}
		why := r.Why
		if r.Detail != "" {
			why = r.Detail + "; " + why
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Key, r.Scope, dash(r.Current), rec, verdict, why)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if netns != "" {
		_, err := fmt.Fprintf(w, "\nnetns settings were read in network namespace %s (the one this command runs in); global ones are the host's.\n", netns)
		return err
	}
	return nil
}

// WriteReport writes what apply or revert did as a table for people.
func WriteReport(w io.Writer, r Report) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SETTING\tSCOPE\tBEFORE\tAFTER\tACTION\tDETAIL")
	for _, c := range r.Changes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.Key, c.Scope, dash(c.Before), dash(c.After), c.Action, c.Detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	switch {
	case r.DryRun:
		_, err := fmt.Fprintln(w, "\ndry run: nothing was written.")
		return err
	case r.StatePath != "":
		_, err := fmt.Fprintf(w, "\noriginals: %s\n", r.StatePath)
		return err
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
