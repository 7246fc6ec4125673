package dataplane

import "testing"

func TestParseVersion(t *testing.T) {
	tests := []struct {
		out     string
		want    toolVersion
		wantErr bool
	}{
		{out: "iptables v1.8.9 (nf_tables)\n", want: toolVersion{1, 8, 9}},
		{out: "ip6tables v1.8.7 (legacy)\n", want: toolVersion{1, 8, 7}},
		{out: "iptables v1.4.21\n", want: toolVersion{1, 4, 21}},
		{out: "iptables: command not found\n", wantErr: true},
	}
	for _, tc := range tests {
		got, err := parseVersion(tc.out)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("parseVersion(%q) = %v, %v; want %v, error %v", tc.out, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestToolVersionAtLeast(t *testing.T) {
	tests := []struct {
		v, since toolVersion
		want     bool
	}{
		{toolVersion{1, 8, 9}, restoreWaitSince, true},
		{toolVersion{1, 6, 2}, restoreWaitSince, true},
		{toolVersion{1, 6, 1}, restoreWaitSince, false},
		{toolVersion{1, 4, 21}, restoreWaitSince, false},
		{toolVersion{1, 4, 21}, iptablesWaitSince, true},
		{toolVersion{1, 4, 19}, iptablesWaitSince, false},
		{toolVersion{2, 0, 0}, randomFullySince, true},
		{toolVersion{0, 9, 9}, randomFullySince, false},
	}
	for _, tc := range tests {
		if got := tc.v.atLeast(tc.since); got != tc.want {
			t.Errorf("%v.atLeast(%v) = %v, want %v", tc.v, tc.since, got, tc.want)
		}
	}
}
