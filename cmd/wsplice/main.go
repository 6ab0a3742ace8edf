// Command wsplice is the WebSocket balancer: `wsplice run` is the agent,
// the other subcommands are the operator CLI that talks to it.
package main

import "os"

func main() { os.Exit(execute(os.Args[1:])) }
