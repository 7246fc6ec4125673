package parity

import "strings"

// difference is one probe whose outcome differs between the proxies.
type difference struct {
	scenario   scenario
	probe      probe
	mini, kube string
	known      string // the name of the known difference it is, if any
}

// knownDifference is a difference between miniproxy and kube-proxy that is
// kept on purpose, documented in docs/parity.md under its name.
type knownDifference struct {
	name    string
	matches func(d difference) bool
}

// knownDifferences are the differences docs/parity.md explains.
var knownDifferences = []knownDifference{
	{
		// The node's own connection to an external or load balancer IP of
		// a Service without a usable endpoint: miniproxy refuses it, as it
		// does for the ClusterIP; kube-proxy rejects only traffic arriving
		// at the node (KUBE-EXTERNAL-SERVICES is not jumped from OUTPUT)
		// and lets the node's own packet leave untranslated.
		name: "node's own traffic to an external address of a Service without endpoints",
		matches: func(d difference) bool {
			fromNode := d.probe.From == "node1" || d.probe.From == "node2"
			external := d.probe.Target == "external IP" || d.probe.Target == "load balancer IP"
			return fromNode && external && d.mini == refused && d.kube != refused && !strings.Contains(d.kube, "<-")
		},
	},
}

// knownAs names the known difference d is, or "".
func knownAs(d difference) string {
	for _, k := range knownDifferences {
		if k.matches(d) {
			return k.name
		}
	}
	return ""
}
