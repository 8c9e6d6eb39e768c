// The unwinder's Go test program: tests/common/mod.rs builds it with `go build`. Go writes its
// CFI only to a compressed .debug_frame. It prints "ready" and spins in spin, called from main.
package main

import "fmt"

//go:noinline
func spin(n int) int {
	for i := 0; ; i++ {
		n += i
		if n == -1 {
			return n
		}
	}
}

func main() {
	fmt.Println("ready")
	fmt.Println(spin(1))
}
