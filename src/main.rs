fn main() {
    println!("bottle");
}
