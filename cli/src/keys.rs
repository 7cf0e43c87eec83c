//! `amend keygen|sign|verify|inspect`.

#[derive(clap::Args)]
pub struct KeygenArgs {}
#[derive(clap::Args)]
pub struct SignArgs {}
#[derive(clap::Args)]
pub struct VerifyArgs {}
#[derive(clap::Args)]
pub struct InspectArgs {}

pub fn keygen(_a: KeygenArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn sign(_a: SignArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn verify(_a: VerifyArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn inspect(_a: InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
