package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/archive"
)

// writeDiff writes containerd's own diff of lower -> upper (archive.WriteDiff, what its
// Diff service streams before compressing) to out: berth's diffs are held to its bytes.
func writeDiff(lower, upper, out string) {
	f, err := os.Create(out)
	if err != nil {
		fail("create", err)
	}
	if err := archive.WriteDiff(context.Background(), f, lower, upper); err != nil {
		fail("write diff", err)
	}
	if err := f.Close(); err != nil {
		fail("close", err)
	}
	fmt.Println("ok")
}
