// Command gendropin writes tune.DropIn() to the file named by its argument;
// `go generate ./pkg/tune` runs it to regenerate sysctl/99-wsplice.conf.
package main

import (
	"fmt"
	"os"

	"github.com/wsplice/wsplice/pkg/tune"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gendropin FILE")
		os.Exit(2)
	}
	if err := os.WriteFile(os.Args[1], tune.DropIn(), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "gendropin:", err)
		os.Exit(1)
	}
}
