fn main() -> std::process::ExitCode {
    // End quietly when the reader of our output goes away (`bottle plan |
    // head`), as Unix tools do: Rust ignores SIGPIPE, and `println!` then
    // panics with a backtrace instead.
    // SAFETY: no other thread exists yet; this restores the default action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    bottle::cli::main()
}
