//! `ktd`: the product binary. Everything it does is the `ktd` library's [`ktd::cli`]; this file
//! only calls it.

fn main() -> std::process::ExitCode {
    ktd::cli::main()
}
