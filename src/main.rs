//! The `thinpool` command: a thin clap front end over the `thinpool` library.
//! Every verb is one small function in `src/cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
