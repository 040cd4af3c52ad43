// Command asdispatch is the asdispatch binary: registration checks today;
// the stub homeserver, demo, status and benchmark join it as subcommands.
package main

import (
	"fmt"
	"io"
	"os"
	"sort"
)

// command is one subcommand: it gets its arguments and output streams and
// returns the process exit code.
type command struct {
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

// commands is the subcommand table; adding a subcommand is one line here.
var commands = map[string]command{
	"check":  {"validate registration files: asdispatch check FILE_OR_DIR...", runCheck},
	"serve":  {"run the stub homeserver: asdispatch serve [--config homeserver.yaml]", runServe},
	"demo":   {"run the seed's walkthrough end to end, no config needed", runDemo},
	"bench":  {"measure fan-out against the baseline and this machine's limit: asdispatch bench [--ases N] [--interest F] [--mix K,K] [--catchup-events N] [--sweep ases=N,N] [--json]", runBench},
	"status": {"show each appservice's state and backlog: asdispatch status --data DIR [--json]", runStatus},
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "asdispatch: unknown command %q\n", args[0])
		usage(stderr)
		return 2
	}
	return c.run(args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: asdispatch COMMAND [ARGS]")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-8s %s\n", n, commands[n].summary)
	}
}
