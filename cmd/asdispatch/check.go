package main

import (
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

// runCheck validates registrations as the homeserver would load them and
// prints what it understood, so an admin sees mistakes before a restart.
func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	server := fs.String("server-name", "localhost", "the homeserver's server_name (for sender user IDs)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintln(stderr, "usage: asdispatch check [--server-name NAME] FILE_OR_DIR...")
		return 2
	}
	set, warns, err := registry.Load(*server, fs.Args()...)
	for _, w := range warns {
		fmt.Fprintf(stdout, "warning: %s\n", w)
	}
	if err != nil {
		fmt.Fprintf(stderr, "%v\n", err)
		return 1
	}
	for _, as := range set.All() {
		url := as.URL
		if !as.HasURL {
			url = "null (no pushes, no queries)"
		}
		fmt.Fprintf(stdout, "%s (%s)\n  url: %s\n  sender: %s\n", as.ID, as.File, url, as.SenderUserID)
		for _, kind := range []struct {
			name string
			ns   []registry.Namespace
		}{{"users", as.Namespaces.Users}, {"aliases", as.Namespaces.Aliases}, {"rooms", as.Namespaces.Rooms}} {
			for _, n := range kind.ns {
				excl := "shared"
				if n.Exclusive {
					excl = "exclusive"
				}
				fmt.Fprintf(stdout, "  %-7s %-9s %s\n", kind.name, excl, n.Regex)
			}
		}
		if as.ReceiveEphemeral {
			fmt.Fprintln(stdout, "  receives ephemeral events and to-device messages")
		}
		if as.MSC3202 {
			fmt.Fprintln(stdout, "  receives device lists and one-time key counts (MSC3202)")
		}
		if as.HasURL {
			fmt.Fprintf(stdout, "  transaction fields: %s\n", strings.Join(dispatcher.Fields(as), ", "))
		}
		if !as.RateLimited {
			fmt.Fprintln(stdout, "  not rate limited")
		}
	}
	fmt.Fprintf(stdout, "%d application services OK\n", set.Len())
	return 0
}
